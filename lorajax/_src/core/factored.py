"""Factored execution: `lorajax.lora(fn)` rewrites uses of adapted weights.

`fn(params, *args)` is traced to a jaxpr and evaluated by a small interpreter.
Each adapted weight enters as a `_Tagged` value: the base weight plus the
low-rank factors `A'` and `B'`, kept in the weight's current axis layout while
structural ops (casts, transposes, reshapes, broadcasts, slices) act on it.
Where a tagged value meets a matmul (`dot_general`), an embedding lookup
(`gather`) or a convolution, the interpreter emits `op(x, W) + scale *
op(op(x, A'), B')`, so neither the dense `W + scale * A @ B` nor its dense
gradient is ever formed. Every other use falls back to the merged weight for
that use alone, and says so.
"""

import contextvars
import dataclasses
import functools
import math
import string
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex

from lorajax._src.core import paths as paths_lib
from lorajax._src.core import quant as quant_lib
from lorajax._src.core.adapter import LoraWeight, check_fit, is_node as _is_node
from lorajax._src.core.config import LoraConfig

PyTree = Any


class LoraFallbackWarning(UserWarning):
  """An adapted weight was used by an op the factored path cannot factor.

  For that use only, the merged weight `W + scale * a @ b` was materialised.
  """


class LoraFallbackError(ValueError):
  """Raised by `lorajax.lora(fn, strict=True)` instead of a fallback."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Tagged:
  """A value derived from an adapted weight by structural ops.

  `base` is the transformed base weight. `roles` has one letter per axis of
  `base`: `s` (in both factors), `i` (in `a` only), `o` (in `b` only). `a`
  holds the `s`/`i` axes of `base` in order plus a trailing rank axis, `b` the
  `s`/`o` axes plus a trailing rank axis, and the value's merged form is
  `base + scale * sum_r a[..., r] * b[..., r]`.
  """

  base: jax.Array
  a: jax.Array
  b: jax.Array
  roles: str = dataclasses.field(metadata=dict(static=True))
  scale: float = dataclasses.field(metadata=dict(static=True))
  path: str = dataclasses.field(metadata=dict(static=True))

  @property
  def a_axes(self) -> list[int]:
    return [j for j, c in enumerate(self.roles) if c in "si"]

  @property
  def b_axes(self) -> list[int]:
    return [j for j, c in enumerate(self.roles) if c in "so"]

  def replace(self, **kw) -> "_Tagged":
    return dataclasses.replace(self, **kw)


def _from_node(w: jax.Array, node: LoraWeight, path: str) -> _Tagged:
  axes = node.axes
  s_ax = [j for j, c in enumerate(axes) if c == "s"]
  i_ax = [j for j, c in enumerate(axes) if c == "i"]
  o_ax = [j for j, c in enumerate(axes) if c == "o"]
  # node.a is (*stack, *in, r) and node.b (*stack, r, *out); reorder both to
  # the weight's axis order with the rank axis last.
  a_src = s_ax + i_ax
  a = jnp.transpose(node.a, [a_src.index(j) for j in sorted(a_src)]
                    + [len(a_src)])
  b = jnp.moveaxis(node.b, len(s_ax), -1)
  b_src = s_ax + o_ax
  b = jnp.transpose(b, [b_src.index(j) for j in sorted(b_src)]
                    + [len(b_src)])
  return _Tagged(w, a, b, axes, float(node.scale), path)


def _letters():
  return iter(string.ascii_letters)


def _delta(t: _Tagged, dtype: Any = jnp.float32) -> jax.Array:
  """The dense `scale * a @ b` in `t`'s current layout (fallbacks only)."""
  names = _letters()
  v = [next(names) for _ in t.roles]
  r = next(names)
  a_spec = "".join(v[j] for j in t.a_axes) + r
  b_spec = "".join(v[j] for j in t.b_axes) + r
  d = jnp.einsum(f"{a_spec},{b_spec}->{''.join(v)}", t.a.astype(jnp.float32),
                 t.b.astype(jnp.float32), precision=lax.Precision.HIGHEST)
  return (t.scale * d).astype(dtype)


def _materialize(t: _Tagged) -> jax.Array:
  base = t.base
  if quant_lib.is_quantized(base):  # [quantized bases]
    base = quant_lib.dequantize(base, jnp.float32)
  return (base + _delta(t)).astype(t.base.dtype)


def _reshape_groups(old: Sequence[int], new: Sequence[int]):
  """Pairs runs of old and new axes whose sizes have equal products."""
  groups = []
  i = j = 0
  while i < len(old) or j < len(new):
    og, ng, po, pn = [], [], 1, 1
    if i < len(old):
      og.append(i)
      po *= old[i]
      i += 1
    if j < len(new):
      ng.append(j)
      pn *= new[j]
      j += 1
    while po != pn:
      if po < pn and i < len(old):
        og.append(i)
        po *= old[i]
        i += 1
      elif pn < po and j < len(new):
        ng.append(j)
        pn *= new[j]
        j += 1
      else:
        return None
    groups.append((og, ng))
  return groups


class _Interpreter:
  """Evaluates a jaxpr with `_Tagged` values for the adapted weights."""

  def __init__(self, strict: bool):
    self.strict = strict
    self.reported: set[tuple[str, str]] = set()

  # -- fallbacks -------------------------------------------------------------

  def fallback(self, t: _Tagged, op: str, why: str = "") -> jax.Array:
    msg = (
        f"lorajax.lora: the adapted weight {t.path!r} is used by `{op}`"
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
    if (t.path, op) not in self.reported:
      self.reported.add((t.path, op))
      warnings.warn(msg, LoraFallbackWarning, stacklevel=2)
    return _materialize(t)

  def plain(self, x: Any, op: str) -> Any:
    if quant_lib.is_quantized(x):  # [quantized bases]
      return _dense_quantized(x, op)
    return self.fallback(x, op) if isinstance(x, _Tagged) else x

  # -- the evaluation loop -----------------------------------------------------

  def eval(self, jaxpr: jex.Jaxpr, consts: Sequence[Any],
           args: Sequence[Any]) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v):
      return v.val if isinstance(v, jex.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
      env[v] = x
    for v, x in zip(jaxpr.invars, args):
      env[v] = x
    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      if any(isinstance(x, _Tagged) for x in invals):
        outs = self.eval_tagged(eqn, invals)
      elif (eqn.primitive.name in _HIGHER_ORDER
            and any(quant_lib.is_quantized(x) for x in invals)):
        # [quantized bases] Follow a quantized weight into sub-jaxprs.
        outs = getattr(self, "_" + eqn.primitive.name)(eqn, invals)
      else:
        outs = _bind(eqn, invals)
      for v, x in zip(eqn.outvars, outs):
        if not isinstance(v, jex.DropVar):
          env[v] = x
    return [read(v) for v in jaxpr.outvars]

  def eval_closed(self, closed: jex.ClosedJaxpr, args: Sequence[Any]):
    return self.eval(closed.jaxpr, closed.consts, args)

  def eval_tagged(self, eqn, invals: list[Any]) -> list[Any]:
    name = eqn.primitive.name
    handler = getattr(self, "_" + name, None)
    if handler is not None:
      out = handler(eqn, invals)
      if out is not None:
        return out
    elif name in _PASSTHROUGH and isinstance(invals[0], _Tagged) and not any(
        isinstance(x, _Tagged) for x in invals[1:]):
      t = invals[0]
      base = _bind(eqn, [t.base, *invals[1:]])[0]
      return [t.replace(base=base)]
    invals = [self.plain(x, name) for x in invals]
    return _bind(eqn, invals)

  # -- structural ops: the factors follow the weight -----------------------

  def _convert_element_type(self, eqn, invals):
    (t,) = invals
    return [t.replace(base=_bind(eqn, [t.base])[0])]

  def _transpose(self, eqn, invals):
    (t,) = invals
    perm = list(eqn.params["permutation"])
    roles = "".join(t.roles[p] for p in perm)
    old_a, old_b = t.a_axes, t.b_axes
    new = t.replace(roles=roles)
    a_perm = [old_a.index(perm[j]) for j in new.a_axes] + [len(old_a)]
    b_perm = [old_b.index(perm[j]) for j in new.b_axes] + [len(old_b)]
    return [new.replace(base=_bind(eqn, [t.base])[0],
                        a=jnp.transpose(t.a, a_perm),
                        b=jnp.transpose(t.b, b_perm))]

  def _broadcast_in_dim(self, eqn, invals):
    t, *dyn = invals
    if dyn:
      return None
    shape = tuple(eqn.params["shape"])
    bdims = list(eqn.params["broadcast_dimensions"])
    roles = ["i"] * len(shape)  # New axes are constant: put them in `a`.
    for k, d in enumerate(bdims):
      roles[d] = t.roles[k]
    new = t.replace(roles="".join(roles))

    def grow(x, old_axes, new_axes):
      target = [shape[j] for j in new_axes] + [x.shape[-1]]
      dims = [new_axes.index(bdims[k]) for k in old_axes] + [len(new_axes)]
      return lax.broadcast_in_dim(x, target, dims)

    return [new.replace(base=_bind(eqn, [t.base])[0],
                        a=grow(t.a, t.a_axes, new.a_axes),
                        b=grow(t.b, t.b_axes, new.b_axes))]

  def _reshape(self, eqn, invals):
    t, *dyn = invals
    if dyn or eqn.params.get("dimensions") is not None:
      return None
    old, new_shape = t.base.shape, tuple(eqn.params["new_sizes"])
    groups = _reshape_groups(old, new_shape)
    if groups is None:
      return None
    roles = [""] * len(new_shape)
    for og, ng in groups:
      kinds = {t.roles[j] for j in og if old[j] != 1}
      if len(kinds) > 1:
        return None  # Merges axes of different roles: not low-rank.
      kind = kinds.pop() if kinds else "i"
      for j in ng:
        roles[j] = kind
    new = t.replace(roles="".join(roles))
    a_shape = [new_shape[j] for j in new.a_axes] + [t.a.shape[-1]]
    b_shape = [new_shape[j] for j in new.b_axes] + [t.b.shape[-1]]
    return [new.replace(base=_bind(eqn, [t.base])[0],
                        a=jnp.reshape(t.a, a_shape),
                        b=jnp.reshape(t.b, b_shape))]

  def _squeeze(self, eqn, invals):
    (t,) = invals
    dims = {d % t.base.ndim for d in eqn.params["dimensions"]}
    roles = "".join(c for j, c in enumerate(t.roles) if j not in dims)
    a_dims = tuple(k for k, j in enumerate(t.a_axes) if j in dims)
    b_dims = tuple(k for k, j in enumerate(t.b_axes) if j in dims)
    return [t.replace(base=_bind(eqn, [t.base])[0], roles=roles,
                      a=lax.squeeze(t.a, a_dims), b=lax.squeeze(t.b, b_dims))]

  def _expand_dims(self, eqn, invals):
    return None  # Appears as reshape/broadcast_in_dim in jaxprs.

  def _slice(self, eqn, invals):
    (t,) = invals
    start = eqn.params["start_indices"]
    limit = eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(start)

    def cut(x, axes):
      return lax.slice(x, [start[j] for j in axes] + [0],
                       [limit[j] for j in axes] + [x.shape[-1]],
                       [strides[j] for j in axes] + [1])

    return [t.replace(base=_bind(eqn, [t.base])[0], a=cut(t.a, t.a_axes),
                      b=cut(t.b, t.b_axes))]

  def _dynamic_slice(self, eqn, invals):
    t, *idx = invals
    if any(isinstance(i, _Tagged) for i in idx):
      return None
    sizes = eqn.params["slice_sizes"]
    n = t.base.ndim
    if len(idx) != n:  # Dynamic shapes: not supported here.
      return None
    zero = jnp.zeros((), jnp.asarray(idx[0]).dtype) if idx else 0

    def cut(x, axes):
      return lax.dynamic_slice(x, [idx[j] for j in axes] + [zero],
                               [sizes[j] for j in axes] + [x.shape[-1]])

    return [t.replace(base=_bind(eqn, [t.base, *idx])[0],
                      a=cut(t.a, t.a_axes), b=cut(t.b, t.b_axes))]

  # -- the uses that are factored --------------------------------------------

  def _dot_general(self, eqn, invals):
    lhs, rhs = invals
    if isinstance(lhs, _Tagged) and isinstance(rhs, _Tagged):
      return None
    tagged_lhs = isinstance(lhs, _Tagged)
    t, x = (lhs, rhs) if tagged_lhs else (rhs, lhs)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    t_con, x_con = (lc, rc) if tagged_lhs else (rc, lc)
    t_bat, x_bat = (lb, rb) if tagged_lhs else (rb, lb)
    out_aval = eqn.outvars[0].aval
    base_out = _bind(eqn, [t.base, x] if tagged_lhs else [x, t.base])[0]

    names = _letters()
    v = [next(names) for _ in t.roles]
    xs = [None] * x.ndim
    for xi, ti in zip(x_con, t_con):
      xs[xi] = v[ti]
    for xi, ti in zip(x_bat, t_bat):
      xs[xi] = v[ti]
    for k in range(x.ndim):
      if xs[k] is None:
        xs[k] = next(names)
    r = next(names)
    batch = "".join(v[j] for j in t_bat)
    t_free = "".join(v[j] for j in range(len(v))
                     if j not in t_con and j not in t_bat)
    x_free = "".join(xs[k] for k in range(x.ndim)
                     if k not in x_con and k not in x_bat)
    out = batch + (t_free + x_free if tagged_lhs else x_free + t_free)
    a_spec = "".join(v[j] for j in t.a_axes) + r
    b_spec = "".join(v[j] for j in t.b_axes) + r
    dtype = jnp.result_type(x.dtype, t.base.dtype)
    delta = _low_rank_contract(
        "".join(xs), x.astype(dtype), a_spec, t.a.astype(dtype), b_spec,
        t.b.astype(dtype), out, scale=t.scale,
        precision=eqn.params.get("precision"),
        preferred_element_type=eqn.params.get("preferred_element_type"))
    return [(base_out + delta.astype(out_aval.dtype)).astype(out_aval.dtype)]

  def _gather(self, eqn, invals):
    t, idx = invals
    if isinstance(idx, _Tagged):
      return None
    stacked = self._gather_stacked(eqn, t, idx)
    if stacked is not None:
      return stacked
    if t.base.ndim != 2 or t.roles != "io":
      return None
    dn = eqn.params["dimension_numbers"]
    sizes = tuple(eqn.params["slice_sizes"])
    if (tuple(dn.collapsed_slice_dims) != (0,)
        or tuple(dn.start_index_map) != (0,)
        or tuple(dn.operand_batching_dims) or sizes[1] != t.base.shape[1]
        or len(dn.offset_dims) != 1):
      return None
    # Embedding lookup: rows of W + scale * (rows of a) @ b.
    base_out = _bind(eqn, [t.base, idx])[0]
    params = dict(eqn.params, slice_sizes=(1, t.a.shape[-1]))
    rows_a = _bind_params(eqn.primitive, [t.a, idx], params)[0]
    pos = dn.offset_dims[0]
    rows = jnp.moveaxis(rows_a, pos, -1).astype(base_out.dtype)
    d = jnp.einsum("...r,or->...o", rows, t.b.astype(base_out.dtype))
    return [base_out + jnp.moveaxis(t.scale * d, -1, pos).astype(
        base_out.dtype)]

  def _gather_stacked(self, eqn, t, idx):
    """Indexing into stacked axes only (`w[expert_ids]`): a structural op."""
    dn = eqn.params["dimension_numbers"]
    sizes = tuple(eqn.params["slice_sizes"])
    shape = t.base.shape
    keys = tuple(dn.start_index_map)
    if (tuple(dn.operand_batching_dims) or not keys
        or set(dn.collapsed_slice_dims) != set(keys)
        or any(t.roles[k] != "s" for k in keys)
        or any(sizes[j] != shape[j] for j in range(len(shape))
               if j not in keys)):
      return None
    base_out = _bind(eqn, [t.base, idx])[0]
    kept = [j for j in range(len(shape)) if j not in keys]
    offset = list(dn.offset_dims)
    n_out = base_out.ndim
    batch_pos = [p for p in range(n_out) if p not in offset]
    out_pos = dict(zip(kept, offset))  # Operand axis -> output position.
    roles = ["s"] * n_out
    for j in kept:
      roles[out_pos[j]] = t.roles[j]
    new = t.replace(base=base_out, roles="".join(roles))

    def pick(f, axes, new_axes):
      nb = len(batch_pos)
      kept_f = [j for j in axes if j not in keys]
      f_dn = dn._replace(
          offset_dims=tuple(range(nb, nb + len(kept_f) + 1)),
          collapsed_slice_dims=tuple(
              axes.index(k) for k in dn.collapsed_slice_dims),
          start_index_map=tuple(axes.index(k) for k in keys))
      params = dict(eqn.params, dimension_numbers=f_dn,
                    slice_sizes=tuple(sizes[j] for j in axes) + (
                        f.shape[-1],))
      g = _bind_params(eqn.primitive, [f, idx], params)[0]
      pos = batch_pos + [out_pos[j] for j in kept_f]
      perm = [pos.index(p) for p in new_axes] + [len(pos)]
      return jnp.transpose(g, perm)

    return [new.replace(a=pick(t.a, t.a_axes, new.a_axes),
                        b=pick(t.b, t.b_axes, new.b_axes))]

  def _conv_general_dilated(self, eqn, invals):
    x, t = invals
    if isinstance(x, _Tagged) or not isinstance(t, _Tagged):
      return None
    p = eqn.params
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
      return None
    dn = p["dimension_numbers"]
    rhs_out = dn.rhs_spec[0]
    if t.roles[rhs_out] != "o" or t.roles.count("o") != 1 or "s" in t.roles:
      return None
    base_out = _bind(eqn, [x, t.base])[0]
    dtype = base_out.dtype
    # `a` as a conv kernel to `rank` output channels, then `b` as a 1x1 conv.
    kernel_a = jnp.moveaxis(t.a, -1, rhs_out).astype(x.dtype)
    h = _bind_params(eqn.primitive, [x, kernel_a], p)[0]
    feat = dn.out_spec[1]
    d = jnp.einsum("...r,or->...o", jnp.moveaxis(h, feat, -1),
                   t.b.astype(h.dtype))
    return [base_out + jnp.moveaxis(t.scale * d, -1, feat).astype(dtype)]

  # -- higher-order primitives ------------------------------------------------

  def _inline(self, eqn, invals, key):
    return self.eval_closed(_closed(eqn.params[key]), invals)

  def _jit(self, eqn, invals):
    return self._inline(eqn, invals, "jaxpr")

  _pjit = _jit

  def _closed_call(self, eqn, invals):
    return self._inline(eqn, invals, "call_jaxpr")

  _core_call = _closed_call

  def _custom_jvp_call(self, eqn, invals):
    # Differentiating through the primal implementation is exact; the custom
    # rule is a numerical nicety for activations, not weights.
    return self._inline(eqn, invals, "call_jaxpr")

  def _custom_vjp_call(self, eqn, invals):
    key = "call_jaxpr" if "call_jaxpr" in eqn.params else "fun_jaxpr"
    return self._inline(eqn, invals, key)

  _custom_vjp_call_jaxpr = _custom_vjp_call

  def _remat2(self, eqn, invals):
    jaxpr = eqn.params["jaxpr"]
    closed = _closed(jaxpr)
    fn = jax.checkpoint(lambda *a: self.eval_closed(closed, a),
                        policy=eqn.params.get("policy"),
                        prevent_cse=eqn.params.get("prevent_cse", True))
    return list(fn(*invals))

  _checkpoint = _remat2

  def _scan(self, eqn, invals):
    p = eqn.params
    n_c, n_carry = p["num_consts"], p["num_carry"]
    consts = invals[:n_c]
    carry = [self.plain(x, "scan carry") for x in invals[n_c:n_c + n_carry]]
    xs = invals[n_c + n_carry:]
    closed = _closed(p["jaxpr"])

    # A tagged xs is scanned along axis 0: its factors travel with it when
    # they hold that axis, and are loop constants otherwise.
    packed = []
    for x in xs:
      if isinstance(x, _Tagged):
        packed.append((x.base, x.a if x.roles[0] in "si" else None,
                       x.b if x.roles[0] in "so" else None))
      else:
        packed.append(x)

    def body(c, sl):
      xs_vals = []
      for x, s in zip(xs, sl):
        if isinstance(x, _Tagged):
          base, a, b = s
          xs_vals.append(x.replace(base=base, roles=x.roles[1:],
                                   a=x.a if a is None else a,
                                   b=x.b if b is None else b))
        else:
          xs_vals.append(s)
      outs = self.eval_closed(closed, [*consts, *c, *xs_vals])
      outs = [self.plain(o, "scan output") for o in outs]
      return outs[:n_carry], outs[n_carry:]

    carry_out, ys = lax.scan(body, carry, packed, length=p["length"],
                             reverse=p["reverse"], unroll=p["unroll"])
    return [*carry_out, *ys]

  def _cond(self, eqn, invals):
    index, *ops = invals
    index = self.plain(index, "cond index")
    branches = [
        (lambda br: lambda *o: [self.plain(x, "cond output")
                                for x in self.eval_closed(br, o)])(
                                    _closed(br))
        for br in eqn.params["branches"]
    ]
    return list(lax.switch(index, branches, *ops))

  def _while(self, eqn, invals):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    c_consts, b_consts = invals[:nc], invals[nc:nc + nb]
    init = [self.plain(x, "while carry") for x in invals[nc + nb:]]
    cj, bj = _closed(p["cond_jaxpr"]), _closed(p["body_jaxpr"])

    def cond_fn(c):
      return self.plain(self.eval_closed(cj, [*c_consts, *c])[0], "while")

    def body_fn(c):
      return [self.plain(x, "while carry")
              for x in self.eval_closed(bj, [*b_consts, *c])]

    return list(lax.while_loop(cond_fn, body_fn, init))


# Ops that act on the value but leave its low-rank structure as is.
_PASSTHROUGH = frozenset({
    "sharding_constraint", "copy", "copy_p", "optimization_barrier",
    "device_put", "reduce_precision", "mesh_cast", "reshard",
})


def _low_rank_contract(x_spec: str, x: jax.Array, a_spec: str, a: jax.Array,
                       b_spec: str, b: jax.Array, out: str, *, scale: float,
                       precision: Any, preferred_element_type: Any
                       ) -> jax.Array:
  """`scale * einsum(x, a, b -> out)` as two explicit contractions, x first.

  `x` is contracted with one factor first, then the result with the other:
  `a @ b` (the dense delta) is never formed. Of the two orders, the one with
  the smaller intermediate is used: `(x @ a) @ b` for an ordinary matmul,
  `(x @ b^T) @ a^T` when the weight's output axes are the contracted ones (a
  tied output head `x @ E.T`). `scale` multiplies the small intermediate.
  """
  # XLA:CPU runs the backward of a rank-sized contraction over several token
  # axes (`btd,btr->dr`) several times slower than over one, so runs of
  # `x`'s free axes (its token axes) are merged into one axis first.
  free = [c for c in x_spec if c not in a_spec and c not in b_spec]
  run = "".join(free)
  if len(free) > 1 and run in x_spec and run in out:
    z = next(c for c in string.ascii_letters
             if c not in x_spec + a_spec + b_spec + out)
    i = x_spec.index(run)
    merged_shape = (x.shape[:i] + (math.prod(x.shape[i:i + len(run)]),)
                    + x.shape[i + len(run):])
    y = _low_rank_contract(
        x_spec.replace(run, z), jnp.reshape(x, merged_shape), a_spec, a,
        b_spec, b, out.replace(run, z), scale=scale, precision=precision,
        preferred_element_type=preferred_element_type)
    j = out.index(run)
    return jnp.reshape(
        y, y.shape[:j] + x.shape[i:i + len(run)] + y.shape[j + 1:])
  sizes = {}
  for spec, arr in ((x_spec, x), (a_spec, a), (b_spec, b)):
    sizes.update(zip(spec, arr.shape))

  def plan(first, second):
    keep = set(second) | set(out)
    h = "".join(dict.fromkeys(c for c in x_spec + first if c in keep))
    return h, math.prod(sizes[c] for c in h)

  (h_a, n_a), (h_b, n_b) = plan(a_spec, b_spec), plan(b_spec, a_spec)
  if n_a <= n_b:
    (f_spec, f), (s_spec, s), h_spec = (a_spec, a), (b_spec, b), h_a
  else:
    (f_spec, f), (s_spec, s), h_spec = (b_spec, b), (a_spec, a), h_b
  h = jnp.einsum(f"{x_spec},{f_spec}->{h_spec}", x, f, precision=precision,
                 preferred_element_type=preferred_element_type)
  h = (scale * h).astype(s.dtype)
  return jnp.einsum(f"{h_spec},{s_spec}->{out}", h, s,
                    precision=precision,
                    preferred_element_type=preferred_element_type)


def _closed(j) -> jex.ClosedJaxpr:
  return j if isinstance(j, jex.ClosedJaxpr) else jex.ClosedJaxpr(j, ())


def _bind_params(prim, invals, params):
  bound = prim.get_bind_params(params)
  # JAX < 0.7 returns `(subfuns, params)`; newer versions just the params.
  if isinstance(bound, tuple):
    subfuns, bound = bound
  else:
    subfuns = ()
  out = prim.bind(*subfuns, *invals, **bound)
  return list(out) if prim.multiple_results else [out]


# -- [quantized bases] -----------------------------------------------------------
# A params leaf may be a `QuantizedWeight` (lorajax/_src/core/quant.py): it is
# traced as a dense array of its shape and dtype, and the interpreter carries
# the node itself (alone, or as a `_Tagged`'s base). Every bind of a
# primitive on it goes through `quant.bind_quantized`, which applies casts and
# structural ops to its codes and scales, runs matmuls as `quant.qdot`
# (dequantized at the matmul; the backward saves codes, not a dense weight)
# and gathers rows of a quantized table. Anything else dequantizes the
# weight for that use and says so (or raises under `strict=True`).

_HIGHER_ORDER = frozenset({
    "jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
    "custom_vjp_call", "custom_vjp_call_jaxpr", "remat2", "checkpoint",
    "scan", "cond", "while",
})
_STRICT = contextvars.ContextVar("lorajax_lora_strict", default=False)


def _dense_quantized(q: Any, op: str) -> jax.Array:
  msg = quant_lib.dense_fallback_message(op, q)
  if _STRICT.get():
    raise LoraFallbackError(
        msg + " `strict=True` forbids this: keep the weight dense (leave it"
        " out of `lorajax.quantize`) or drop `strict=True`.")
  warnings.warn(msg, LoraFallbackWarning, stacklevel=3)
  return quant_lib.dequantize(q)


def _bind(eqn, invals):
  if any(quant_lib.is_quantized(x) for x in invals):
    out = quant_lib.bind_quantized(eqn.primitive.name, eqn.primitive,
                                   eqn.params, list(invals))
    if out is not None:
      return out
    invals = [_dense_quantized(x, eqn.primitive.name)
              if quant_lib.is_quantized(x) else x for x in invals]
  return _bind_params(eqn.primitive, invals, eqn.params)


def _is_dynamic(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic,
                        jax.ShapeDtypeStruct))


def _trace(fn, params, args, kwargs):
  """Traces `fn(params, *args, **kwargs)`; array leaves become inputs."""
  # [quantized bases] A QuantizedWeight is one leaf, traced as its dense
  # shape and dtype.
  p_leaves, p_def = jax.tree.flatten(params, is_leaf=quant_lib.is_quantized)
  ak_leaves, ak_def = jax.tree.flatten((args, kwargs))
  dyn_idx = [i for i, x in enumerate(ak_leaves) if _is_dynamic(x)]

  def flat_fn(p_leaves, dyn):
    ak = list(ak_leaves)
    for i, x in zip(dyn_idx, dyn):
      ak[i] = x
    a, kw = jax.tree.unflatten(ak_def, ak)
    return fn(jax.tree.unflatten(p_def, p_leaves), *a, **kw)

  dyn = [ak_leaves[i] for i in dyn_idx]
  traced = [jax.ShapeDtypeStruct(x.shape, x.dtype)
            if quant_lib.is_quantized(x) else x for x in p_leaves]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(traced,
                                                                  dyn)
  return closed, out_shape, p_leaves, dyn


def lora(fn: Callable[..., Any], *, strict: bool = False) -> Callable[..., Any]:
  """Runs `fn` with adapted weights in factored form.

  `lora(fn)(params, adapter, *args, **kwargs)` equals `fn(lorajax.merge(params,
  adapter), *args, **kwargs)` in value and in gradient with respect to the
  adapter, but every matmul with an adapted weight `W` is computed as `x @ W +
  scale * (x @ a) @ b` (with the contraction taken from the matmul's own
  dimension numbers), so the dense `W + scale * a @ b` and the dense weight
  gradient `x^T @ dy` are never formed. Embedding lookups (gather rows of `a`,
  then `@ b`) and convolutions (a conv to `rank` channels, then a 1x1 conv)
  are factored too. The weight is followed through casts, reshapes,
  transposes, broadcasts, squeezes, slices of stacked axes, nested `jit`,
  `scan` (the factors are sliced with the stacked weight), `remat`,
  `custom_jvp`/`custom_vjp`, `cond` and `while`.

  Any other use of an adapted weight gets the merged value for that use only,
  with a `LoraFallbackWarning` naming the weight and the op (once per trace).

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
    check_fit(params, adapter)
    nodes, a_def = jax.tree_util.tree_flatten_with_path(adapter,
                                                        is_leaf=_is_node)
    subtrees = a_def.flatten_up_to(params)
    tags = []
    for (kp, node), sub in zip(nodes, subtrees):
      if isinstance(node, LoraWeight):
        tags.append(_from_node(sub, node, paths_lib.path_str(kp)))
      else:
        tags.extend([None] * len(jax.tree.leaves(
            sub, is_leaf=quant_lib.is_quantized)))
    closed, out_shape, p_leaves, dyn = _trace(fn, params, args, kwargs)
    inputs = [t if t is not None else w for t, w in zip(tags, p_leaves)]
    interp = _Interpreter(strict)
    token = _STRICT.set(strict)
    try:
      outs = interp.eval_closed(closed, [*inputs, *dyn])
      outs = [interp.plain(o, "output") for o in outs]
    finally:
      _STRICT.reset(token)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return wrapped


# -- axes inference ------------------------------------------------------------

_STRUCTURAL = frozenset({"convert_element_type", *_PASSTHROUGH})
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr",
          "custom_jvp_call": "call_jaxpr"}


class _AxesWalker:
  """Follows weights through a jaxpr and records each axis's role at its uses.

  A tracked value is `(path, axes)`: for each of its axes, the set of original
  weight axes it came from.
  """

  def __init__(self):
    self.roles: dict[str, dict[int, set[str]]] = {}

  def record(self, tracked, axis_roles: dict[int, str]):
    path, axes = tracked
    book = self.roles.setdefault(path, {})
    for j, role in axis_roles.items():
      for orig in axes[j]:
        book.setdefault(orig, set()).add(role)

  def walk(self, jaxpr, ins):
    env = {}
    read = lambda v: None if isinstance(v, jex.Literal) else env.get(v)  # noqa
    for v, x in zip(jaxpr.invars, ins):
      env[v] = x
    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      if any(x is not None for x in invals):
        outs = self.eqn(eqn, invals)
        for v, x in zip(eqn.outvars, outs):
          if not isinstance(v, jex.DropVar):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]

  def eqn(self, eqn, invals):
    name, p = eqn.primitive.name, eqn.params
    none = [None] * len(eqn.outvars)
    t = invals[0]
    if name in _STRUCTURAL or name == "slice":
      return [t] if t is not None else none
    if name == "transpose":
      return [(t[0], [t[1][q] for q in p["permutation"]])]
    if name == "broadcast_in_dim":
      axes = [frozenset()] * len(p["shape"])
      for k, d in enumerate(p["broadcast_dimensions"]):
        axes[d] = t[1][k]
      return [(t[0], axes)]
    if name == "squeeze":
      dims = {d % len(t[1]) for d in p["dimensions"]}
      return [(t[0], [a for j, a in enumerate(t[1]) if j not in dims])]
    if name == "reshape":
      old = eqn.invars[0].aval.shape
      groups = _reshape_groups(old, p["new_sizes"])
      if groups is None:
        return none
      axes = [frozenset()] * len(p["new_sizes"])
      for og, ng in groups:
        merged = frozenset().union(*(t[1][j] for j in og if old[j] != 1))
        for j in ng:
          axes[j] = merged
      return [(t[0], axes)]
    if name == "dynamic_slice" and t is not None:
      shape = eqn.invars[0].aval.shape
      self.record(t, {j: "s" for j, s in enumerate(p["slice_sizes"])
                      if s == 1 and shape[j] > 1})
      return [t]
    if name == "gather" and t is not None:
      dn = p["dimension_numbers"]
      collapsed = set(dn.collapsed_slice_dims)
      if len(t[1]) == 2 and collapsed == {0}:  # An embedding lookup.
        self.record(t, {0: "i", 1: "o"})
        return none
      self.record(t, {j: "s" for j in collapsed})
      if (set(dn.start_index_map) == collapsed and eqn.outvars
          and not tuple(dn.operand_batching_dims)):
        # Indexing stacked axes (`w[expert_ids]`): follow the selected slices.
        kept = [j for j in range(len(t[1])) if j not in collapsed]
        axes = [frozenset()] * len(eqn.outvars[0].aval.shape)
        for j, pos in zip(kept, dn.offset_dims):
          axes[pos] = t[1][j]
        return [(t[0], axes)]
      return none
    if name == "dot_general":
      (lc, rc), (lb, rb) = p["dimension_numbers"]
      for x, con, bat in ((invals[0], lc, lb), (invals[1], rc, rb)):
        if x is not None:
          roles = {j: "o" for j in range(len(x[1]))}
          roles.update({j: "i" for j in con})
          roles.update({j: "s" for j in bat})
          self.record(x, roles)
      return none
    if name == "conv_general_dilated" and invals[1] is not None:
      rhs = invals[1]
      out = p["dimension_numbers"].rhs_spec[0]
      self.record(rhs, {j: ("o" if j == out else "i")
                        for j in range(len(rhs[1]))})
      return none
    if name in _CALLS or name in ("custom_vjp_call", "custom_vjp_call_jaxpr"):
      key = _CALLS.get(name) or ("call_jaxpr" if "call_jaxpr" in p
                                 else "fun_jaxpr")
      return self.walk(_closed(p[key]).jaxpr, invals)
    if name == "scan":
      n_c, n_carry = p["num_consts"], p["num_carry"]
      ins = list(invals)
      for k in range(n_c + n_carry, len(ins)):
        if ins[k] is not None:
          self.record(ins[k], {0: "s"})
          ins[k] = (ins[k][0], ins[k][1][1:])
      for k in range(n_c, n_c + n_carry):
        ins[k] = None
      self.walk(_closed(p["jaxpr"]).jaxpr, ins)
      return none
    if name == "cond":
      for br in p["branches"]:
        self.walk(_closed(br).jaxpr, invals[1:])
      return none
    if name == "while":
      nc, nb = p["cond_nconsts"], p["body_nconsts"]
      body_in = invals[nc:nc + nb] + [None] * (len(invals) - nc - nb)
      self.walk(_closed(p["body_jaxpr"]).jaxpr, body_in)
      return none
    return none


def infer_axes(fn: Callable[..., Any], params: PyTree, *args: Any,
               config: LoraConfig, **kwargs: Any) -> dict[str, str]:
  """Works out `LoraConfig.axes` entries from how `fn` uses its weights.

  Traces `fn(params, *args, **kwargs)` once (abstractly: arrays or
  `jax.ShapeDtypeStruct` leaves both work) and follows every targeted weight
  with more than two axes to its matmuls: contracted axes are inputs (`i`),
  batch axes and axes that are scanned or indexed into are stacked (`s`), and
  the remaining axes are outputs (`o`). An expert axis must therefore be a
  batch axis of the matmul (`"etd,edf->etf"`) to be inferred as stacked; used
  as a free axis (`"td,edf->tef"`, every token through every expert) it is an
  output axis, and one adapter then spans all experts.

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
  import re  # pylint: disable=g-import-not-at-top

  if not isinstance(config, LoraConfig):
    raise TypeError(
        "`config` must be a lorajax.LoraConfig (pass it by keyword:"
        f" `infer_axes(fn, params, *args, config=...)`); got {config!r}.")
  flat = paths_lib.leaves_with_paths(params, is_leaf=quant_lib.is_quantized)
  wanted = {}
  for path, leaf in flat:
    shape, dtype = tuple(leaf.shape), leaf.dtype
    if len(shape) > 2 and config._is_target(path, len(shape), dtype):  # pylint: disable=protected-access
      wanted[path] = shape
  closed, _, p_leaves, dyn = _trace(fn, params, args, kwargs)
  del p_leaves
  ins = [(path, [frozenset({j}) for j in range(len(leaf.shape))])
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
