"""Factored execution: `lorajax.lora(fn)` rewrites uses of adapted weights.

`fn(params, *args)` is traced to a jaxpr and evaluated by a small interpreter.
Each adapted weight enters as a `Factored` value: the base weight plus the
adapter's arrays (for LoRA the factors `a` and `b`), kept in the weight's
current axis layout while structural ops (casts, transposes, reshapes,
broadcasts, slices, stacked-axis gathers) act on it. Where such a value meets
a matmul (`dot_general`), a grouped matmul (`ragged_dot`), an embedding lookup
(`gather`) or a convolution, its adapter kind emits e.g. `op(x, W) + scale *
op(op(x, a), b)`, so neither the dense `W + scale * a @ b` nor its dense
gradient is ever formed. Concatenated adapted weights (fused QKV) stay
factored. Every other use falls back to the merged weight for that use alone,
and says so (`LoraFallbackWarning`; `LoraFallbackError` under `strict=True`).
A `custom_jvp`/`custom_vjp` function applied to an adapted weight is always
run on the merged weight, so its custom derivative rule is honoured.

Structure (see docs/factored_internals.md):

* `_rules()`: the one rule table, keyed on primitive objects (resolved in
  `jax_compat`), each `Rule` naming a category the interpreter and
  `infer_axes` both dispatch on. `rules_markdown()` renders it for the docs.
* `layouts`: one layout-transfer function per structural op and one role
  function per use, shared by the interpreter and `infer_axes`.
* `jax_compat`: every read of `eqn.params`, and the primitive objects.
* `extend`: the extension points. An adapter kind (`AdapterKind`,
  `register_adapter_kind`) decides how a node type becomes a `Factored`
  value and what it contributes at each use; `LoraWeight` is one
  (`lora_kind`). A lazy base (`LazyBase`, a params leaf that is not an
  array, e.g. quantized codes) is traced by its dense shape, carried through
  structural ops by `LazyBase.structural`, and made dense only at a use by
  `LazyBase.use`.

References:
  Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".
"""

import dataclasses
import functools
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex

from lorajax._src.core import (
  explicit,
  layouts,
  lora_kind,  # noqa: F401  (registers LoraWeight)
  method_kinds,  # noqa: F401  (registers VeraWeight; DoRA)
)
from lorajax._src.core import jax_compat as jc
from lorajax._src.core import paths as paths_lib
from lorajax._src.core.adapter import check_fit
from lorajax._src.core.config import LoraConfig
from lorajax._src.core.extend import (
  BASE_ONLY,
  Factored,
  LazyBase,
  Use,
  adapter_kind,
  aval_of,
  dense,
  held_axes,
  is_adapter_node,
)

PyTree = Any


class LoraFallbackWarning(UserWarning):
  """An adapted weight was used by an op the factored path cannot factor.

  For that use only, the merged weight `W + scale * a @ b` was materialised.
  """


class LoraFallbackError(ValueError):
  """Raised by `lorajax.lora(fn, strict=True)` instead of a fallback."""


# -- the rule table ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """How `lorajax.lora` and `infer_axes` treat one primitive.

  Attributes:
    name: The logical primitive name (a key of `jax_compat.primitives()`).
    category: What the interpreter does with a factored operand:
      `structural` (a layout transfer from `layouts.STRUCTURAL`: the op is
      applied to the base and to every adapter array), `cast` (structural
      when `cast_kind` says the cast is exact or rounding, else a reported
      fallback to the merged weight), `passthrough` (the
      op acts on the base; the adapter arrays are unchanged), `use` (the
      adapter kind's hook `hook` computes the factored result), `fused`
      (the kind's `concatenate` builds a factored value), `call` (the body
      is interpreted inline), `remat` (interpreted inside `jax.checkpoint`),
      `custom` (run on the merged weight: the custom rule is honoured),
      `scan`, `cond`, `while` (bodies interpreted; carries fall back),
      `shard_map` (body interpreted per shard on the factors' shards),
      `vary` (a `shard_map` type cast applied to the base and the factors),
      `all_gather` (a tiled gather of the factors holding the axis).
    doc: One line for the generated table in docs/factored_rules.md.
    hook: For `use`: the `AdapterKind` method name.
  """

  name: str
  category: str
  doc: str
  hook: str | None = None


_RULES = (
    Rule("convert_element_type", "cast", "value-preserving (to a float"
         " type holding every value: bf16 -> f32) or rounding (float to a"
         " float of 16 bits or more: f32 -> bf16/f16): casts the base, the"
         " factors keep their dtype; any other cast (int, bool, fp8,"
         " complex): fallback"),
    Rule("transpose", "structural", "permutes the factors' axes with the"
         " weight's"),
    Rule("broadcast_in_dim", "structural", "broadcasts the factors; new axes"
         " join `a`"),
    Rule("reshape", "structural", "reshapes the factors when no new axis"
         " mixes input and output axes"),
    Rule("squeeze", "structural", "squeezes the factors"),
    Rule("slice", "structural", "slices the factors (any axis)"),
    Rule("dynamic_slice", "structural", "dynamic-slices the factors (e.g."
         " one layer of a stack)"),
    Rule("rev", "structural", "reverses the factors"),
    Rule("gather", "use", "a lookup (full slices except the indexed and"
         " vmap-batched axes; any axis, index layout, mode): indexing input"
         " or output axes (embeddings, `vmap` of `w[i]`, transposed tables)"
         " gathers the factor holding them, then contracts the rank;"
         " indexing stacked axes (`w[expert_ids]`) gathers the factors and"
         " stays factored", "gather"),
    Rule("dot_general", "use", "`x @ W + scale * (x @ a) @ b`, any dimension"
         " numbers; both operands adapted: fallback", "dot_general"),
    Rule("ragged_dot_general", "use", "MoE grouped matmul: `ragged_dot(x, a)`"
         " then `ragged_dot(., b)` with the same group sizes (B per expert)",
         "ragged_dot"),
    Rule("conv_general_dilated", "use", "conv with `a` to `rank` channels,"
         " then `b` as a 1x1 conv", "conv"),
    Rule("concatenate", "fused", "fused weights (QKV, gate/up): `a` and `b`"
         " concatenated / block-diagonal in rank"),
    Rule("copy", "passthrough", "acts on the base"),
    Rule("device_put", "passthrough", "acts on the base"),
    Rule("sharding_constraint", "passthrough", "constrains the base; the"
         " factors are left to the compiler"),
    Rule("reduce_precision", "cast", "a no-op (as many exponent and"
         " mantissa bits as the dtype): nothing; else fallback"),
    Rule("optimization_barrier", "passthrough", "acts on the base"),
    Rule("reshard", "passthrough", "reshards the base; the factors are left"
         " to the compiler"),
    Rule("jit", "call", "body interpreted inline"),
    Rule("closed_call", "call", "body interpreted inline"),
    Rule("remat", "remat", "body interpreted inside `jax.checkpoint` with the"
         " same policy"),
    Rule("custom_jvp_call", "custom", "run on the merged weight (reported"
         " fallback naming the function): the custom rule is honoured"),
    Rule("custom_vjp_call", "custom", "run on the merged weight (reported"
         " fallback naming the function): the custom rule is honoured"),
    Rule("scan", "scan", "scanned weights are sliced with their factors;"
         " weights in the carry fall back"),
    Rule("cond", "cond", "branches interpreted; weights returned from a"
         " branch fall back"),
    Rule("while", "while", "bodies interpreted; weights in the carry fall"
         " back"),
    Rule("shard_map", "shard_map", "body interpreted per shard: each factor"
         " enters with the weight's `in_specs` entries on the axes it holds"
         " (rank axis unsharded), so its local `a @ b` is the local block of"
         " the merged weight; weights returned from the body fall back"),
    Rule("pvary", "vary", "inside `shard_map`: marks the base and its"
         " factors varying over the same mesh axes"),
    Rule("all_gather", "all_gather", "inside `shard_map`, tiled: gathers the"
         " factors holding the gathered axis (FSDP); other uses fall back"),
)


@functools.cache
def _rules() -> dict[Any, Rule]:
  """Primitive object -> Rule, for every rule whose primitive resolves."""
  prims = jc.primitives()
  return {prims[r.name]: r for r in _RULES if r.name in prims}


def rules_markdown() -> str:
  """The supported-primitive table of docs/factored_rules.md.

  Returns:
    Markdown text generated from the rule table.
  """
  lines = [
      "# Primitives `lorajax.lora` factors",
      "",
      "Generated from the rule table in `lorajax/_src/core/factored.py` by"
      " `rules_markdown()`; `tests/test_factored_rules.py` checks that this"
      " file"
      " matches. An adapted weight reaching any primitive not listed here"
      " gets the merged weight `W + scale * a @ b` for that use"
      " (`LoraFallbackWarning`, or `LoraFallbackError` under"
      " `strict=True`).",
      "",
      "| primitive | category | what happens to an adapted weight |",
      "|---|---|---|",
  ]
  for r in _RULES:
    lines.append(f"| `{r.name}` | {r.category} | {r.doc} |")
  lines += [
      "",
      "## Casts",
      "",
      "The factored path casts `W` and adds the low-rank term unrounded; the"
      " merged path casts `W + scale * a @ b`. A cast of an adapted weight"
      " therefore stays factored only when that makes no difference or only"
      " a rounding difference (`cast_kind` in `factored.py`):",
      "",
      "| cast of an adapted weight | kind | what happens |",
      "|---|---|---|",
      "| float to a float holding every value (bf16 -> f32, f16 -> f32,"
      " f32 -> f64, same dtype) | exact | stays factored |",
      "| float to a float of 16 bits or more holding fewer values (f32 ->"
      " bf16, f32 -> f16, f64 -> f32) | rounding | stays factored; differs"
      " from the merged result by rounding `W` alone instead of `W + scale *"
      " a @ b` (within one unit in the last place of the target type per"
      " weight entry) |",
      "| to an integer, bool, 8-bit float (fp8 e4m3/e5m2), complex; from a"
      " non-float weight | lossy | fallback: the merged weight is cast"
      " (reported; `LoraFallbackError` under `strict=True`) |",
      "| `reduce_precision` keeping the dtype's bits | exact | stays"
      " factored |",
      "| any other `reduce_precision` (fake quantization) | lossy |"
      " fallback |",
      "",
      "## Gathers",
      "",
      "A gather is recognised by its dimension numbers. It is a *lookup* when"
      " it indexes some axes of the weight (`start_index_map` axes whose"
      " slice is shorter than the axis), takes the indexed-into slices whole"
      " along every other axis except `vmap` batching axes, and has mode"
      " `clip`, `fill` or `promise_in_bounds`; the index layout and batch"
      " dims of the indices are free. The indexed axes must share one"
      " role:",
      "",
      "* input or output axes (`w[ids]`, `jnp.take(w, ids, axis=...)`,"
      " `jax.vmap(lambda i: w[i])`, `jnp.take(w.T, ids, axis=1)`,"
      " `w.at[ids].get(mode=...)`, `vmap` over a stacked table): the same"
      " gather is applied to `W` and to the factor that holds the indexed"
      " axes, the other factor is only moved, and the kind's dense form of"
      " the gathered rows is returned (`W[ids] + scale * a[ids] @ b`); in"
      " `fill` mode the windows out of bounds take the base's fill value,"
      " which is what the merged path gives, whatever the fill value;",
      "* stacked axes (`w[expert_ids]`): the factors are gathered and the"
      " result stays factored; in `fill` mode only for a fill value of 0 or"
      " NaN (the default), else fallback;",
      "* anything else (indexed axes of different roles, e.g."
      " `jnp.take_along_axis` picking one column per row; partial static"
      " slices inside the gather; `one_hot` mode): fallback.",
  ]
  return "\n".join(lines) + "\n"


# -- casts ---------------------------------------------------------------------


def _float_info(dtype: Any) -> Any:
  dt = np.dtype(dtype)
  if not jnp.issubdtype(dt, jnp.floating):
    return None
  return jnp.finfo(dt)


def cast_kind(name: str, params: dict, src: Any) -> tuple[str, str]:
  """Whether a cast of an adapted weight may stay factored.

  The factored path casts the base `W` and leaves the low-rank term
  `scale * a @ b` unrounded (the factors are cast to the computation dtype
  where they meet the matmul), while the merged path casts `W + scale * a @
  b`. The two agree exactly when the cast loses nothing, and to within the
  target's rounding when it only rounds:

  * `exact`: a float-to-float cast whose target holds every value of the
    source (as many or more exponent and mantissa bits: bf16 -> f32,
    f16 -> f32, f32 -> f64, same dtype); a `reduce_precision` that keeps at
    least the source's bits (a no-op).
  * `rounding`: a float-to-float cast to a float type of 16 bits or more
    that holds fewer values (f32 -> bf16, f32 -> f16, f64 -> f32): this is
    how mixed-precision models run, so it stays factored; the result
    differs from the merged one by rounding `W` alone instead of `W + scale
    * a @ b` (one unit in the last place of the target type, relative to
    the weight), in value and gradient.
  * `lossy`: everything else: casts to integers, booleans, 8-bit (or
    narrower) floats such as fp8 e4m3/e5m2, complex types, casts from
    non-float weights, and any `reduce_precision` that drops bits (fake
    quantization). These fall back to the merged weight for that use
    (reported), so the result is `fn(merge(params, adapter))` exactly.

  Args:
    name: `convert_element_type` or `reduce_precision`.
    params: The primitive's params.
    src: The dtype of the weight being cast.

  Returns:
    `(kind, why)`: one of `"exact"`, `"rounding"`, `"lossy"`, and for
    `"lossy"` a reason for the fallback message.
  """
  fs = _float_info(src)
  src_name = np.dtype(src).name
  if name == "reduce_precision":
    e, m = jc.reduce_precision_bits(params)
    if fs is not None and e >= fs.nexp and m >= fs.nmant:
      return "exact", ""
    return "lossy", (f"reduce_precision to {e} exponent and {m} mantissa"
                     f" bits rounds {src_name} values, and must round the"
                     " adapted weight W + scale * a @ b, not W alone")
  dst = np.dtype(jc.convert_new_dtype(params))
  fd = _float_info(dst)
  if dst == np.dtype(src):
    return "exact", ""
  if fs is not None and fd is not None:
    if (fd.nexp >= fs.nexp and fd.nmant >= fs.nmant
        and fd.maxexp >= fs.maxexp and fd.minexp <= fs.minexp):
      return "exact", ""
    if fd.bits >= 16:
      return "rounding", ""
  return "lossy", (f"a cast from {src_name} to {dst.name} is not"
                   " value-preserving, so it must be applied to the adapted"
                   " weight W + scale * a @ b, not to W alone")


# -- the interpreter -----------------------------------------------------------


class _Interpreter:
  """Evaluates a jaxpr with `Factored` values for the adapted weights."""

  def __init__(self, strict: bool):
    self.strict = strict
    self.reported: set[tuple[str, str]] = set()
    self.rules = _rules()
    self.by_category: dict[str, Callable[..., list[Any] | None]] = {
        "structural": self._structural, "cast": self._cast,
        "passthrough": self._passthrough,
        "use": self._use, "fused": self._fused, "call": self._call,
        "remat": self._remat, "custom": self._custom, "scan": self._scan,
        "cond": self._cond, "while": self._while,
        "shard_map": self._shard_map, "vary": self._vary,
        "all_gather": self._all_gather,
    }
    # For weights inside `shard_map` bodies: the mesh axes each factor is
    # sharded over (from the `in_specs` it entered with), by weight path.
    self.part_mesh_axes: dict[str, tuple[frozenset, ...]] = {}

  # -- fallbacks --

  def lazy_fallback(self, v: Factored, op: str) -> jax.Array:
    """A lazy base (e.g. quantized) made dense for one use, reported."""
    msg = (
        f"lorajax.lora: the frozen weight {v.path!r} ({v.base!r}) is used by"
        f" `{op}`, which cannot run on its stored form; for this use the"
        " dense weight is materialised (dequantized), costing a dense copy"
        " of it."
    )
    if self.strict:
      raise LoraFallbackError(
          msg + " `strict=True` forbids this: keep the weight dense (leave"
          " it out of `lorajax.quantize`) or drop `strict=True`.")
    if (v.path, op) not in self.reported:
      self.reported.add((v.path, op))
      warnings.warn(msg, LoraFallbackWarning, stacklevel=3)
    return dense(v.base)

  def fallback(self, v: Factored, op: str, why: str = "") -> jax.Array:
    if v.kind is BASE_ONLY:
      return self.lazy_fallback(v, op)
    if _is_lookup(v):
      # A row (or column) of the weight, e.g. `table[token]` with a scalar
      # id (a slice, not a gather): merging it costs what the factors
      # hold, as a gather lookup does. Exact; nothing to report.
      return v.kind.materialize(v)
    msg = (
        f"lorajax.lora: the adapted weight {v.path!r} is used by `{op}`"
        f"{' (' + why + ')' if why else ''}, which the factored path does not"
        " factor; for this use the merged weight W + scale * a @ b is"
        " materialised, costing what merging costs."
    )
    if self.strict:
      raise LoraFallbackError(
          msg + " `strict=True` forbids this: restructure the model so the"
          " weight reaches a matmul, embedding lookup or convolution through"
          " casts, reshapes, transposes, broadcasts or slices, exclude the"
          " weight from `targets`, or drop `strict=True` to allow the"
          " fallback."
      )
    if (v.path, op) not in self.reported:
      self.reported.add((v.path, op))
      warnings.warn(msg, LoraFallbackWarning, stacklevel=2)
    return v.kind.materialize(v)

  def plain(self, x: Any, op: str, why: str = "") -> Any:
    return self.fallback(x, op, why) if isinstance(x, Factored) else x

  # -- the evaluation loop --

  def eval(self, jaxpr: jex.Jaxpr, consts: Sequence[Any],
           args: Sequence[Any]) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v):
      return v.val if jc.is_literal(v) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
      env[v] = x
    for v, x in zip(jaxpr.invars, args):
      env[v] = x
    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      # Each equation runs in the context it was traced in (as in
      # `jax.core.eval_jaxpr`): its abstract mesh differs from the outer
      # one inside `jax.sharding.auto_axes` or a `shard_map` body.
      with jc.eqn_context(eqn):
        if any(isinstance(x, Factored) for x in invals):
          outs = self.eval_factored(eqn, invals)
        else:
          outs = jc.bind_eqn(eqn, invals)
      for v, x in zip(eqn.outvars, outs):
        if not jc.is_dropvar(v):
          env[v] = x
    return [read(v) for v in jaxpr.outvars]

  def eval_closed(self, closed: jex.ClosedJaxpr, args: Sequence[Any]):
    return self.eval(closed.jaxpr, closed.consts, args)

  def eval_factored(self, eqn, invals: list[Any]) -> list[Any]:
    rule = self.rules.get(eqn.primitive)
    if rule is not None:
      out = self.by_category[rule.category](rule, eqn, invals)
      if out is not None:
        return out
    name = eqn.primitive.name
    return jc.bind_eqn(eqn, [self.plain(x, name) for x in invals])

  # -- categories --

  def _structural(self, rule, eqn, invals, make=None):
    v, *rest = invals
    if not isinstance(v, Factored) or any(isinstance(x, Factored)
                                          for x in rest):
      return None
    op = (make or layouts.STRUCTURAL[rule.name])(eqn, rest)
    roles = None if op is None else op.out_roles(v.roles)
    if roles is None:
      return None
    base = v.base
    if isinstance(base, LazyBase):
      new_base = base.structural(op)
      base = (op.bind_dense(self.lazy_fallback(v, rule.name))
              if new_base is None else new_base)
    else:
      base = op.bind_dense(base)
    if v.kind is BASE_ONLY and not isinstance(base, LazyBase):
      return [base]
    parts = tuple(
        op.apply_to(p, held_axes(v.roles, m), held_axes(roles, m))
        for p, m in zip(v.parts, v.masks))
    return [v.replace(base=base, parts=parts, roles=roles)]

  def _passthrough(self, rule, eqn, invals):
    del rule
    outs = jc.bind_eqn(eqn, [dense(x.base) if isinstance(x, Factored) else x
                             for x in invals])
    if len(outs) != len(invals):
      return None
    # A reshard / mesh_cast of the weight moves its factors with it (kinds
    # with a `refit` hook lay them out like the new base).
    return [_refit(x.replace(base=o)) if isinstance(x, Factored) and x.kind
            is not BASE_ONLY else o for x, o in zip(invals, outs)]

  def _use(self, rule, eqn, invals):
    pos = [k for k, x in enumerate(invals) if isinstance(x, Factored)]
    if len(pos) > 1:
      # A looked-up row meeting another weight (`head(table[token])`): the
      # row is merged (as cheap as the lookup), the weight stays factored.
      invals = [x.kind.materialize(x) if isinstance(x, Factored) and (
          x.kind is not BASE_ONLY and _is_lookup(x)) else x for x in invals]
      pos = [k for k, x in enumerate(invals) if isinstance(x, Factored)]
    if len(pos) != 1:
      return None  # Both operands adapted: not low-rank; fall back.
    v = invals[pos[0]]
    use = Use(eqn.primitive, eqn.params, tuple(invals), pos[0],
              jc.out_aval(eqn))
    out = getattr(v.kind, rule.hook)(v, use)
    if out is not None:
      return [out]
    if rule.name == "gather" and pos[0] == 0 and (
        layouts.gather_selects_stacked(eqn, v.roles)):
      return self._structural(rule, eqn, invals)
    return None

  def _cast(self, rule, eqn, invals):
    v, *rest = invals
    if not isinstance(v, Factored) or any(isinstance(x, Factored)
                                          for x in rest):
      return None
    kind, why = cast_kind(rule.name, eqn.params, v.dtype)
    if v.kind is BASE_ONLY:
      # No adapter: casting the base is casting the weight, and a lazy base
      # knows how to cast itself (or is made dense). A `reduce_precision`
      # that changes values is not a layout change: it needs the dense base.
      if rule.name == "convert_element_type" or kind == "exact":
        return self._structural(rule, eqn, invals)
      return jc.bind_eqn(eqn, [self.lazy_fallback(v, rule.name), *rest])
    if kind != "lossy":
      return self._structural(rule, eqn, invals)
    return jc.bind_eqn(eqn, [self.fallback(v, rule.name, why), *rest])

  def _fused(self, rule, eqn, invals):
    del rule
    kinds = {x.kind for x in invals if isinstance(x, Factored)}
    if len(kinds) != 1 or BASE_ONLY in kinds:
      return None
    pos = next(k for k, x in enumerate(invals) if isinstance(x, Factored))
    use = Use(eqn.primitive, eqn.params, tuple(invals), pos,
              jc.out_aval(eqn))
    out = kinds.pop().concatenate(use)
    return None if out is None else [out]

  def _call(self, rule, eqn, invals):
    del rule
    return self.eval_closed(jc.call_body(eqn.params), invals)

  def _remat(self, rule, eqn, invals):
    del rule
    body = jc.call_body(eqn.params)
    fn = jax.checkpoint(lambda *a: self.eval_closed(body, a),
                        **jc.remat_options(eqn.params))
    return list(fn(*invals))

  def _custom(self, rule, eqn, invals):
    # The user's derivative rule must win over differentiating the primal:
    # run the custom call itself, on merged weights.
    op = f"{rule.name} of {jc.custom_name(eqn.params)}"
    why = "a custom derivative rule is honoured by running it on the merged"
    why += " weight"
    return jc.bind_eqn(eqn, [self.plain(x, op, why) for x in invals])

  def _scan(self, rule, eqn, invals):
    del rule
    p = jc.scan_params(eqn.params)
    consts = invals[:p.num_consts]
    carry = [self.plain(x, "scan carry")
             for x in invals[p.num_consts:p.num_consts + p.num_carry]]
    xs = invals[p.num_consts + p.num_carry:]

    # A factored xs is scanned along axis 0: its adapter arrays travel with
    # it when they hold that axis, and are loop constants otherwise.
    packed, rebuilds = [], []
    for x in xs:
      rebuild = None
      if isinstance(x, Factored):
        base = x.base
        if isinstance(base, LazyBase):
          split = base.scan_split()
          base, rebuild = ((base.dequantize(), None) if split is None
                           else split)
        parts = tuple(a if x.roles[0] in m else None
                      for a, m in zip(x.parts, x.masks))
        packed.append((base, parts))
      else:
        packed.append(x)
      rebuilds.append(rebuild)

    def body(c, sl):
      vals = []
      for x, s, rebuild in zip(xs, sl, rebuilds):
        if isinstance(x, Factored):
          base, parts = s
          base = base if rebuild is None else rebuild(base)
          parts = tuple(a if s_a is None else s_a
                        for a, s_a in zip(x.parts, parts))
          val = x.replace(base=base, parts=parts, roles=x.roles[1:])
          if x.kind is BASE_ONLY and not isinstance(base, LazyBase):
            val = base
          vals.append(val)
        else:
          vals.append(s)
      outs = self.eval_closed(p.body, [*consts, *c, *vals])
      outs = [self.plain(o, "scan output") for o in outs]
      return outs[:p.num_carry], outs[p.num_carry:]

    carry_out, ys = lax.scan(body, carry, packed, length=p.length,
                             reverse=p.reverse, unroll=p.unroll)
    return [*carry_out, *ys]

  def _cond(self, rule, eqn, invals):
    del rule
    index, *ops = invals
    index = self.plain(index, "cond index")

    def branch(br):
      return lambda *o: [self.plain(x, "cond output")
                         for x in self.eval_closed(br, o)]

    return list(lax.switch(index, [branch(b) for b in
                                   jc.cond_branches(eqn.params)], *ops))

  def _while(self, rule, eqn, invals):
    del rule
    p = jc.while_params(eqn.params)
    nc, nb = p.cond_nconsts, p.body_nconsts
    c_consts, b_consts = invals[:nc], invals[nc:nc + nb]
    init = [self.plain(x, "while carry") for x in invals[nc + nb:]]

    def cond_fn(c):
      return self.plain(self.eval_closed(p.cond, [*c_consts, *c])[0],
                        "while")

    def body_fn(c):
      return [self.plain(x, "while carry")
              for x in self.eval_closed(p.body, [*b_consts, *c])]

    return list(lax.while_loop(cond_fn, body_fn, init))

  def _shard_map(self, rule, eqn, invals):
    """A `shard_map` whose body uses adapted weights, run factored.

    The weight `W` enters the body as its local block; so do its factors,
    each sharded like `W` on the weight axes it holds (the user's
    `in_specs` entry for those axes) and unsharded on its own axes (the
    rank axis). With the rank axis whole, the local `a @ b` is exactly the
    local block of `a @ b`, so the body computes with the local block of
    the merged weight, whatever it then does (collectives included): every
    use is as exact as outside `shard_map`, and the gradients of the
    replicated factor axes are summed by `shard_map`'s own transpose.
    """
    del rule
    p = jc.shard_map_params(eqn.params)
    if any(isinstance(x, Factored) and (
        x.kind is BASE_ONLY or isinstance(x.base, LazyBase)) for x in invals):
      return None  # A lazy base: no local block to hand over (fallback).
    flat, specs, sizes = [], [], []
    for x, spec in zip(invals, p.in_specs):
      if not isinstance(x, Factored):
        flat.append(x)
        specs.append(spec)
        sizes.append(1)
        continue
      entries = tuple(spec) + (None,) * (x.ndim - len(tuple(spec)))
      flat.append(x.base)
      specs.append(spec)
      for k, part in enumerate(x.parts):
        held = x.held(k)
        e = (*(entries[j] for j in held), *(None,) * (part.ndim - len(held)))
        sh = explicit.sharding_of(part)
        flat.append(part if sh is None else explicit.reshard(part, sh.mesh, e))
        specs.append(jax.sharding.PartitionSpec(*e))
      self.part_mesh_axes[x.path] = tuple(
          frozenset(_mesh_axes(tuple(q))) for q in specs[-len(x.parts):])
      sizes.append(1 + len(x.parts))

    def body(*local):
      args, k = [], 0
      for x, n in zip(invals, sizes):
        if isinstance(x, Factored):
          base, parts = local[k], local[k + 1:k + n]
          # As varying as the base (no value change; the transpose sums
          # a replicated factor's gradient over the axes it lacks).
          parts = tuple(_match_vma(q, base) for q in parts)
          args.append(x.replace(base=base, parts=parts))
        else:
          args.append(local[k])
        k += n
      outs = self.eval_closed(p.body, args)
      return tuple(self.plain(o, "shard_map output") for o in outs)

    mapped = jax.shard_map(body, mesh=p.mesh, in_specs=tuple(specs),
                           out_specs=p.out_specs,
                           axis_names=set(p.manual_axes),
                           check_vma=p.check_vma)
    return list(mapped(*flat))

  def _all_gather(self, rule, eqn, invals):
    """A tiled `all_gather` of a weight inside `shard_map` (FSDP).

    Gathering the merged weight's blocks along axis `d` is gathering the
    factors that hold `d`, provided every factor that does not hold `d`
    is the same on all the devices gathered over (it is not sharded over
    the gathered mesh axes).
    """
    del rule
    v = invals[0]
    if len(invals) != 1 or not isinstance(v, Factored) or (
        v.kind is BASE_ONLY):
      return None
    g = jc.all_gather_params(eqn.params)
    known = self.part_mesh_axes.get(v.path)
    if not g.tiled or known is None or len(known) != len(v.parts):
      return None
    if any(g.dimension not in v.held(k) and known[k] & set(g.axes)
           for k in range(len(v.parts))):
      return None
    parts = []
    for k, part in enumerate(v.parts):
      held = v.held(k)
      parts.append(part if g.dimension not in held else jc.bind(
          eqn.primitive, [part], jc.with_all_gather_dim(
              eqn.params, held.index(g.dimension)))[0])
    base = jc.bind_eqn(eqn, [dense(v.base)])[0]
    return [v.replace(base=base, parts=tuple(
        _match_vma(q, base) for q in parts))]

  def _vary(self, rule, eqn, invals):
    del rule
    outs = jc.bind_eqn(eqn, [dense(x.base) if isinstance(x, Factored) else x
                             for x in invals])
    if len(outs) != len(invals):
      return None
    return [x.replace(base=o, parts=tuple(_match_vma(q, o) for q in x.parts))
            if isinstance(x, Factored) and x.kind is not BASE_ONLY else o
            for x, o in zip(invals, outs)]


# -- tracing -------------------------------------------------------------------


def _mesh_axes(entries: tuple[Any, ...]) -> list[str]:
  """The mesh axis names in partition spec entries."""
  out: list[str] = []
  for e in entries:
    if isinstance(e, str):
      out.append(e)
    elif isinstance(e, tuple):
      out.extend(n for n in e if isinstance(n, str))
  return out


def _match_vma(x: Any, like: Any) -> Any:
  """`x` marked varying over the manual axes `like` varies over."""
  return jc.pvary(x, tuple(sorted(jc.vma(like) - jc.vma(x))))


def _refit(v: Factored) -> Factored:
  refit = getattr(v.kind, "refit", None)
  return v if refit is None else refit(v)


def _name(fn: Any) -> str:
  return getattr(fn, "__qualname__", None) or repr(fn)


def _is_lookup(v: Factored) -> bool:
  """Whether `v`'s input or output axes are all gone (size 1): then its
  merged value is no larger than its factors (a looked-up row; a lazy base
  dequantizes just that row)."""
  def size(role):
    return math.prod(n for n, r in zip(v.shape, v.roles) if r == role)
  return size("i") == 1 or size("o") == 1


def _is_lazy(x: Any) -> bool:
  return isinstance(x, LazyBase)


def _is_dynamic(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic,
                        jax.ShapeDtypeStruct))


def _trace(fn, params, args, kwargs):
  """Traces `fn(params, *args, **kwargs)`; array leaves become inputs.

  Lazy-base leaves of `params` are traced as their dense shape and dtype.
  """
  p_leaves, p_def = jax.tree.flatten(params, is_leaf=_is_lazy)
  ak_leaves, ak_def = jax.tree.flatten((args, kwargs))
  dyn_idx = [i for i, x in enumerate(ak_leaves) if _is_dynamic(x)]

  def flat_fn(p_leaves, dyn):
    ak = list(ak_leaves)
    for i, x in zip(dyn_idx, dyn):
      ak[i] = x
    a, kw = jax.tree.unflatten(ak_def, ak)
    return fn(jax.tree.unflatten(p_def, p_leaves), *a, **kw)

  dyn = [ak_leaves[i] for i in dyn_idx]
  traced = [aval_of(x) if _is_lazy(x) else x for x in p_leaves]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(traced, dyn)
  return closed, out_shape, p_leaves, dyn


def _check_fit(params: PyTree, adapter: PyTree) -> None:
  """Raises a ValueError naming every weight the adapter does not fit."""
  a_flat, a_def = jax.tree_util.tree_flatten_with_path(
      adapter, is_leaf=is_adapter_node)
  try:
    subs = a_def.flatten_up_to(params)
  except (ValueError, TypeError):
    check_fit(params, adapter)  # Raises the structural error message.
    raise
  errors = []
  for (kp, node), w in zip(a_flat, subs):
    if node is None:
      continue
    path = paths_lib.path_str(kp)
    kind = adapter_kind(node)
    if kind is None:
      errors.append(f"{path!r}: expected an adapter node (a LoraWeight or a"
                    f" registered adapter kind) or None; got {type(node)}.")
      continue
    errors += kind.check(node, tuple(getattr(w, "shape", ())), path)
  if errors:
    raise ValueError("The adapter does not fit the params:\n- "
                     + "\n- ".join(errors))


def _inputs(params: PyTree, adapter: PyTree) -> list[Any]:
  """The interpreter's inputs for the params leaves, in flattening order."""
  nodes = {}
  for kp, node in jax.tree_util.tree_flatten_with_path(
      adapter, is_leaf=is_adapter_node)[0]:
    if node is not None:
      nodes[tuple(kp)] = node
  out = []
  for kp, leaf in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_is_lazy)[0]:
    node = nodes.get(tuple(kp))
    path = paths_lib.path_str(kp)
    if node is not None:
      kind = adapter_kind(node)
      assert kind is not None  # `nodes` holds registered kinds only
      train = jax.tree.leaves(kind.trainable(node))
      if not all(train):
        leaves, treedef = jax.tree.flatten(node)
        node = treedef.unflatten([x if t else lax.stop_gradient(x)
                                  for x, t in zip(leaves, train)])
      out.append(kind.factored(node, leaf, path))
    elif _is_lazy(leaf):
      # No adapter: roles only have to be uniform for layouts to move it.
      out.append(Factored(leaf, (), "s" * len(leaf.shape), (), BASE_ONLY,
                          None, path))
    else:
      out.append(leaf)
  return out


def lora(fn: Callable[..., Any], *, strict: bool = False) -> Callable[..., Any]:
  """Runs `fn` with adapted weights in factored form.

  `lora(fn)(params, adapter, *args, **kwargs)` equals `fn(lorajax.merge(params,
  adapter), *args, **kwargs)` in value and in gradient with respect to the
  adapter, but every matmul with an adapted weight `W` is computed as `x @ W +
  scale * (x @ a) @ b` (with the contraction taken from the matmul's own
  dimension numbers), so the dense `W + scale * a @ b` and the dense weight
  gradient `x^T @ dy` are never formed. Grouped MoE matmuls
  (`jax.lax.ragged_dot`, per-expert `a` and `b`), embedding lookups (gather
  rows of `a`, then `@ b`), convolutions (a conv to `rank` channels, then a
  1x1 conv) and concatenations of adapted weights (fused QKV) are factored
  too. The weight is followed through casts, reshapes, transposes,
  broadcasts, squeezes, slices, stacked-axis indexing, nested `jit`, `scan`
  (the factors are sliced with the stacked weight), `remat`, `cond`,
  `while` and `shard_map` bodies (the factors enter sharded like the
  weight's `in_specs`). docs/factored_rules.md lists every rule.

  Any other use of an adapted weight gets the merged value for that use only,
  with a `LoraFallbackWarning` naming the weight and the op (once per trace).
  A `jax.custom_jvp`/`jax.custom_vjp` function applied to an adapted weight is
  one such use: it runs on the merged weight, so its custom derivative rule
  is honoured.

  Args:
    fn: Any JAX-traceable function `fn(params, *args, **kwargs)`: a linen
      `model.apply`, an NNX `lambda state, x: nnx.merge(graphdef, state)(x)`,
      or plain `jax.numpy` code. Array leaves of `args`/`kwargs` are traced;
      other leaves (Python numbers, strings, flags) are static.
    strict: Raise a `LoraFallbackError` instead of falling back.

  Returns:
    `g(params, adapter, *args, **kwargs)` with `fn`'s outputs. Compose it with
    `jax.jit`, `jax.grad`, `jax.vmap` and shardings as usual.

  Raises:
    ValueError: When called, if `adapter` does not fit `params`.
    LoraFallbackError: When called with `strict=True`, if an adapted weight
      is used by an op that cannot be factored (names the weight and op).

  Warns:
    LoraFallbackWarning: Once per trace for each (weight, op) fallback.
  """

  @functools.wraps(fn)
  def wrapped(params: PyTree, adapter: PyTree, *args: Any, **kwargs: Any):
    _check_fit(params, adapter)
    inputs = _inputs(params, adapter)
    try:
      closed, out_shape, _, dyn = _trace(fn, params, args, kwargs)
    except Exception as e:
      if not explicit.is_sharding_type_error(e):
        raise
      raise explicit.with_user_hint(
          e, f"the function passed to lorajax.lora ({_name(fn)})") from e
    interp = _Interpreter(strict)
    outs = interp.eval_closed(closed, [*inputs, *dyn])
    outs = [interp.plain(o, "output") for o in outs]
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return wrapped


# -- axes inference ------------------------------------------------------------
# A tracked value is a tuple of `(path, origins)` pairs (several after a
# concatenation of weights): for each axis of the value, the set of original
# weight axes it came from.


class _AxesWalker:
  """Follows weights through a jaxpr and records each axis's role at its uses.

  Dispatches on the same rule table as the interpreter and moves layouts
  with the same `layouts` functions.
  """

  def __init__(self):
    self.roles: dict[str, dict[int, set[str]]] = {}
    self.rules = _rules()

  def record(self, tracked, axis_roles: dict[int, str]):
    for path, origins in tracked:
      book = self.roles.setdefault(path, {})
      for j, role in axis_roles.items():
        for orig in origins[j]:
          book.setdefault(orig, set()).add(role)

  def walk(self, jaxpr, ins):
    env = {}

    def read(v):
      return None if jc.is_literal(v) else env.get(v)

    for v, x in zip(jaxpr.invars, ins):
      env[v] = x
    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      if any(x is not None for x in invals):
        outs = self.eqn(eqn, invals)
        for v, x in zip(eqn.outvars, outs):
          if not jc.is_dropvar(v):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]

  def structural(self, name, eqn, t):
    if name in layouts.HINTS:
      self.record(t, layouts.HINTS[name](eqn))
    op = layouts.STRUCTURAL[name](eqn, None)
    if op is None:
      return None
    return tuple((path, op.out_origins(origins)) for path, origins in t)

  def eqn(self, eqn, invals):
    none = [None] * len(eqn.outvars)
    rule = self.rules.get(eqn.primitive)
    if rule is None:
      return none
    cat, name = rule.category, rule.name
    if cat in ("structural", "cast"):
      # Lossy casts still move the layout: the merged weight a fallback
      # uses needs the same axes.
      return [self.structural(name, eqn, invals[0])] if invals[0] else none
    if cat in ("passthrough", "vary"):
      return invals[:len(none)] if len(invals) >= len(none) else none
    if cat == "use":
      used = False
      for pos, x in enumerate(invals):
        roles = None if x is None else layouts.USE_ROLES[name](eqn, pos)
        if roles is not None:
          self.record(x, roles)
          used = True
      if not used and name in layouts.STRUCTURAL and invals[0]:
        return [self.structural(name, eqn, invals[0])]
      return none
    if cat == "fused":
      pairs = tuple(pair for x in invals if x for pair in x)
      return [pairs]
    if cat in ("call", "remat", "custom"):
      return self.walk(jc.call_body(eqn.params).jaxpr, invals)
    if cat == "shard_map":
      return self.walk(jc.shard_map_params(eqn.params).body.jaxpr, invals)
    if cat == "all_gather":
      g = jc.all_gather_params(eqn.params)
      return [invals[0]] if g.tiled and invals[0] else none
    if cat == "scan":
      p = jc.scan_params(eqn.params)
      ins = list(invals)
      for k in range(p.num_consts + p.num_carry, len(ins)):
        if ins[k] is not None:
          self.record(ins[k], {0: "s"})
          ins[k] = tuple((path, o[1:]) for path, o in ins[k])
      for k in range(p.num_consts, p.num_consts + p.num_carry):
        ins[k] = None
      self.walk(p.body.jaxpr, ins)
      return none
    if cat == "cond":
      for br in jc.cond_branches(eqn.params):
        self.walk(br.jaxpr, invals[1:])
      return none
    if cat == "while":
      p = jc.while_params(eqn.params)
      nc, nb = p.cond_nconsts, p.body_nconsts
      body_in = invals[nc:nc + nb] + [None] * (len(invals) - nc - nb)
      self.walk(p.body.jaxpr, body_in)
      return none
    return none


def infer_axes(fn: Callable[..., Any], params: PyTree, *args: Any,
               config: LoraConfig, **kwargs: Any) -> dict[str, str]:
  """Works out `LoraConfig.axes` entries from how `fn` uses its weights.

  Traces `fn(params, *args, **kwargs)` once (abstractly: arrays or
  `jax.ShapeDtypeStruct` leaves both work) and follows every targeted weight
  with more than two axes to its matmuls: contracted axes are inputs (`i`),
  batch axes, `ragged_dot` group axes and axes that are scanned or indexed
  into are stacked (`s`), and the remaining axes are outputs (`o`). An expert
  axis must therefore be a batch or group axis of the matmul
  (`"etd,edf->etf"`, `ragged_dot`) to be inferred as stacked; used as a free
  axis (`"td,edf->tef"`, every token through every expert) it is an output
  axis, and one adapter then spans all experts.

  Example:
    >>> axes = lorajax.infer_axes(model.apply, params, x, config=config)
    >>> config = dataclasses.replace(config, axes=axes)

  Args:
    fn: The model function, `fn(params, *args, **kwargs)`.
    params: The base params (arrays or `jax.ShapeDtypeStruct`).
    *args: Example positional inputs of `fn`.
    config: A `LoraConfig` (keyword-only); its `targets`/`exclude` choose
      the weights.
    **kwargs: Example keyword inputs of `fn`.

  Returns:
    A dict from each weight's escaped path (a regex matching just it) to its
    axes string, for the targeted weights with more than two axes.

  Raises:
    TypeError: If `config` is not a `LoraConfig`.
    ValueError: If an axis of a targeted weight is never used by a matmul, or
      its uses disagree.
  """
  if not isinstance(config, LoraConfig):
    raise TypeError(
        "`config` must be a lorajax.LoraConfig (pass it by keyword:"
        f" `infer_axes(fn, params, *args, config=...)`); got {config!r}.")
  flat = paths_lib.leaves_with_paths(params, is_leaf=_is_lazy)
  wanted = {}
  for path, leaf in flat:
    shape, dtype = tuple(leaf.shape), leaf.dtype
    if len(shape) > 2 and config._is_target(  # noqa: SLF001
        path, len(shape), dtype):
      wanted[path] = shape
  closed, _, _, dyn = _trace(fn, params, args, kwargs)
  ins = [((path, [frozenset({j}) for j in range(len(leaf.shape))]),)
         if path in wanted else None for path, leaf in flat]
  walker = _AxesWalker()
  walker.walk(closed.jaxpr, [*ins, *[None] * len(dyn)])
  out, errors = {}, []
  for path, shape in wanted.items():
    book = walker.roles.get(path, {})
    letters = []
    for j in range(len(shape)):
      roles = book.get(j, set())
      if len(roles) == 1:
        letters.append(roles.pop())
      elif not roles:
        letters.append("?")
      else:
        letters.append("{" + "|".join(sorted(roles)) + "}")
    axes = "".join(letters)
    if len(axes) != len(shape) or "i" not in axes or "o" not in axes:
      errors.append(
          f"{path!r} (shape {shape}): inferred {axes!r} from its uses ('?'"
          " = no matmul uses that axis, '{a|b}' = uses disagree). Write its"
          " `axes` entry by hand."
      )
      continue
    out[re.escape(path)] = axes
  if errors:
    raise ValueError("infer_axes could not work out every weight:\n- "
                     + "\n- ".join(errors))
  return out
