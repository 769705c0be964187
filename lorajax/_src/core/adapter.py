"""The adapter pytree: `LoraWeight` / `VeraWeight` nodes, `init`, `merge`.

A method (DoRA, VeRA, PiSSA, ...) is a property of the adapter node and its
config, not a code path per model: `LoraWeight.magnitude` makes a node DoRA,
`VeraWeight` is VeRA's node, and every node kind answers the same questions
(its low-rank factors, its per-output rescaling, its dense delta) in the
functions `factors`, `out_scale` and `delta` below, which `merge`, `unmerge`
and the factored interpreter share.
"""

import dataclasses
import math
import warnings
import zlib
from typing import Any

import jax
import jax.numpy as jnp

from lorajax._src.core import explicit
from lorajax._src.core import paths as paths_lib
from lorajax._src.core import quant as quant_lib
from lorajax._src.core.config import LoraConfig, WeightPlan, check_axes
from lorajax._src.core.typing import Array, Float, PRNGKeyArray, PyTree

_LETTERS = "abcdefghijklmnopqstuvwxyz"  # no 'r': it names the rank axis.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, init=False)
class LoraWeight:
  """The low-rank update `scale * a @ b` of one weight.

  `a` and `b` are the only pytree children, so `jax.grad`, optax and orbax see
  just them; `alpha`, `axes` and `rslora` are static metadata, and `scale` is
  derived from them: `alpha / rank`, or `alpha / sqrt(rank)` with `rslora`.

  Attributes:
    a: Shape `(*stack, *in, rank)`: stack and input axes in weight order.
    b: Shape `(*stack, rank, *out)`: stack and output axes in weight order.
    alpha: The LoRA alpha.
    axes: One letter per weight axis: `s` stacked, `i` input, `o` output.
    rslora: Scale by `alpha / sqrt(rank)` (rsLoRA, Kalajdzievski 2023)
      instead of `alpha / rank`.
    magnitude: `None` for plain LoRA. For DoRA (Liu et al. 2024), the trained
      per-output magnitude `m` of shape `(*stack, *out)`: the adapted weight
      is `m * (W + scale * a @ b) / ||W + scale * a @ b||`, the norm taken
      over the input axes for each output unit (PEFT's convention) and
      treated as a constant in the backward pass (as PEFT does).
  """

  a: jax.Array
  b: jax.Array
  alpha: float = dataclasses.field(metadata=dict(static=True))
  axes: str = dataclasses.field(default="io", metadata=dict(static=True))
  rslora: bool = dataclasses.field(default=False,
                                   metadata=dict(static=True))
  magnitude: Any = None

  def __init__(self, a: Any, b: Any, alpha: float | None = None,
               axes: str = "io", rslora: bool = False, *,
               scale: float | None = None, magnitude: Any = None):
    if scale is not None:
      # Deprecated: before 0.2 the scale was stored; derive alpha from it.
      warnings.warn(
          "`LoraWeight(scale=...)` is deprecated and will be removed in"
          " lorajax 0.2.0; pass `alpha=` (and `rslora=True` for alpha /"
          " sqrt(rank)): the scale is derived from them.",
          DeprecationWarning, stacklevel=2)
      if alpha is None:
        rank = a.shape[-1]
        alpha = scale * (math.sqrt(rank) if rslora else rank)
    if alpha is None:
      raise TypeError("`LoraWeight` needs `alpha` (the scale is"
                      " alpha / rank, or alpha / sqrt(rank) with rslora).")
    set_ = object.__setattr__
    set_(self, "a", a)
    set_(self, "b", b)
    set_(self, "alpha", float(alpha))
    set_(self, "axes", axes)
    set_(self, "rslora", bool(rslora))
    set_(self, "magnitude", magnitude)

  @property
  def method(self) -> str:
    """`"lora"`, or `"dora"` when the node has a magnitude."""
    return "lora" if self.magnitude is None else "dora"

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  @property
  def scale(self) -> float:
    """`alpha / rank`, or `alpha / sqrt(rank)` with `rslora`."""
    rank = self.rank
    return self.alpha / (math.sqrt(rank) if self.rslora else rank)

  @property
  def weight_shape(self) -> tuple[int, ...]:
    """The shape of the weight this adapter belongs to."""
    n_s = self.axes.count("s")
    stack = iter(self.a.shape[:n_s])
    ins = iter(self.a.shape[n_s:-1])
    outs = iter(self.b.shape[n_s + 1:])
    pick = {"s": stack, "i": ins, "o": outs}
    return tuple(next(pick[c]) for c in self.axes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VeraWeight:
  """VeRA's update of one 2-D weight (Kopiczko et al. 2024).

  `delta = (a * lambda_d) @ (b * lambda_b[None, :])`: `a` and `b` are frozen
  random projections, slices of one `(max_in, rank)` / `(rank, max_out)` pair
  shared by every adapted weight (PEFT's `vera_A` / `vera_B`, transposed);
  only `lambda_d` and `lambda_b` are trained. Every use of `a` and `b` goes
  through `jax.lax.stop_gradient`, so their gradients are exactly zero and
  plain Adam/SGD leave them unchanged; weight-decaying optimizers need
  `mask=lorajax.optim.decay_mask` (which is False on them), and
  `lorajax.optim.lora_plus` freezes them itself.

  Attributes:
    lambda_d: Shape `(rank,)`, trained.
    lambda_b: Shape `(d_out,)`, trained.
    a: Shape `(d_in, rank)`, frozen.
    b: Shape `(rank, d_out)`, frozen.
    seed: The `projection_prng_key` the projections came from (exports).
    axes: Always `"io"`.
  """

  lambda_d: jax.Array
  lambda_b: jax.Array
  a: jax.Array
  b: jax.Array
  seed: int = dataclasses.field(default=0, metadata=dict(static=True))
  axes: str = dataclasses.field(default="io", metadata=dict(static=True))

  method = "vera"
  scale = 1.0

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  @property
  def weight_shape(self) -> tuple[int, ...]:
    return (self.a.shape[0], self.b.shape[-1])


def is_lora(x: Any) -> bool:
  """True for an adapter node (`LoraWeight`, including DoRA, or `VeraWeight`).
  """
  return isinstance(x, LoraWeight | VeraWeight)


def is_node(x: Any) -> bool:
  """`is_leaf` for adapter trees: an adapter node or a `None` placeholder."""
  return x is None or isinstance(x, LoraWeight | VeraWeight)


def factors(node: Any) -> tuple[jax.Array, jax.Array, float]:
  """`(a, b, scale)` with `delta = scale * a @ b` before any DoRA rescaling.

  For `VeraWeight` the trained vectors are folded into the frozen
  projections: `(stop_gradient(a) * lambda_d, stop_gradient(b) * lambda_b,
  1.0)`, which costs O((d_in + d_out) rank) per call.
  """
  if isinstance(node, VeraWeight):
    dt = jnp.result_type(node.a.dtype, node.lambda_d.dtype)
    a = jax.lax.stop_gradient(node.a).astype(dt) * node.lambda_d.astype(dt)
    b = (jax.lax.stop_gradient(node.b).astype(dt)
         * node.lambda_b.astype(dt)[None, :])
    return a, b, 1.0
  return node.a, node.b, node.scale


def _specs(axes: str) -> tuple[str, str, str, str]:
  """Einsum specs `(a, b, weight, magnitude)` for an axes string."""
  a_spec, b_spec, w_spec = _einsum_specs(axes)
  m_spec = b_spec.replace("r", "")
  return a_spec, b_spec, w_spec, m_spec


def dora_norm(w: jax.Array, node: LoraWeight) -> jax.Array:
  """DoRA's per-output norm `||W + scale * a @ b||`, without a dense delta.

  Per output unit `o` (norm over the input axes),
  `||W_o + s (ab)_o||^2 = ||W_o||^2 + 2 s <W_o, (ab)_o> + s^2 ||(ab)_o||^2`,
  where `<W_o, (ab)_o> = sum_r (W^T a)_{or} b_{ro}` and `||(ab)_o||^2 =
  b_o^T (a^T a) b_o`: two contractions of `W` with small operands (`W` with
  itself to a vector, `W^T a` of shape (out, rank)) and the `rank x rank`
  Gram matrix; no array of the weight's shape is formed. The result is
  stop-gradient (PEFT detaches the norm).

  Args:
    w: The base weight.
    node: A DoRA `LoraWeight` for it.

  Returns:
    float32 norms of shape `(*stack, *out)`.
  """
  a_spec, b_spec, w_spec, m_spec = _specs(node.axes)
  hp = jax.lax.Precision.HIGHEST
  f32 = jnp.float32
  w = jax.lax.stop_gradient(w).astype(f32)
  a = jax.lax.stop_gradient(node.a).astype(f32)
  b = jax.lax.stop_gradient(node.b).astype(f32)
  s = float(node.scale)
  # On an Explicit mesh the input axes contracted below may be sharded (a
  # row-parallel weight): every result is laid out like `W` on the weight
  # axes it keeps, replicated on rank axes.
  w_sh = explicit.sharding_of(w)
  entries = dict(zip(w_spec, explicit.padded_spec(w_sh, w.ndim)
                     if w_sh is not None else ()))
  if w_sh is not None:
    a = explicit.reshard(a, w_sh.mesh, tuple(entries.get(c) for c in a_spec))
    b = explicit.reshard(b, w_sh.mesh, tuple(entries.get(c) for c in b_spec))

  def ein(spec, x, y):
    out = spec.split("->")[1]
    return jnp.einsum(spec, x, y, precision=hp, out_sharding=(
        explicit.out_sharding(w_sh, tuple(entries.get(c) for c in out))))

  wsq = ein(f"{w_spec},{w_spec}->{m_spec}", w, w)
  wa_spec = m_spec + "r"
  wa = ein(f"{w_spec},{a_spec}->{wa_spec}", w, a)
  cross = ein(f"{wa_spec},{b_spec}->{m_spec}", wa, b)
  stack = "".join(c for c in a_spec if c in b_spec and c != "r")
  g_spec = stack + "rR"
  gram = ein(f"{a_spec},{a_spec.replace('r', 'R')}->{g_spec}", a, a)
  gb = ein(f"{g_spec},{b_spec.replace('r', 'R')}->{b_spec}", gram, b)
  quad = ein(f"{b_spec},{b_spec}->{m_spec}", gb, b)
  n2 = wsq + 2.0 * s * cross + (s * s) * quad
  return jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(n2, 0.0)))


def out_scale(w: jax.Array, node: Any) -> jax.Array | None:
  """DoRA's per-output factor `m / stop_gradient(||W + delta||)`, else None.

  Shape `(*stack, *out)`, float32.
  """
  if not isinstance(node, LoraWeight) or node.magnitude is None:
    return None
  return node.magnitude.astype(jnp.float32) / dora_norm(w, node)


def _broadcast_out(g: jax.Array, axes: str) -> jax.Array:
  """A `(*stack, *out)` array broadcast to the weight's axis layout."""
  _, _, w_spec, m_spec = _specs(axes)
  shape = []
  src = []
  for c, role in zip(w_spec, axes):
    if role == "i":
      shape.append(1)
    else:
      src.append(c)
      shape.append(g.shape[m_spec.index(c)])
  g = jnp.transpose(g, [m_spec.index(c) for c in src])
  return jnp.reshape(g, shape)


_is_node = is_node  # local shorthand


def _einsum_specs(axes: str) -> tuple[str, str, str]:
  """Einsum operand specs `(a, b, weight)` for an axes string."""
  letters = iter(_LETTERS)
  names = [next(letters) for _ in axes]
  pick = lambda c: "".join(n for n, x in zip(names, axes) if x == c)  # noqa
  s, i, o = pick("s"), pick("i"), pick("o")
  return f"{s}{i}r", f"{s}r{o}", "".join(names)


def delta(node: LoraWeight,
          dtype: Any = jnp.float32) -> Float[Array, "*weight"]:
  """The dense update `scale * (a contracted with b)`, in weight axis order.

  For a `VeraWeight` it is `(a * lambda_d) @ (b * lambda_b)`. For DoRA this
  is the low-rank part only; the merged weight also rescales each output
  unit (see `merge`).

  Args:
    node: One adapter node.
    dtype: Dtype of the computation and of the result.

  Returns:
    An array with the shape of the adapted weight.
  """
  a, b, scale = factors(node)
  a_spec, b_spec, w_spec = _einsum_specs(node.axes)
  d = jnp.einsum(
      f"{a_spec},{b_spec}->{w_spec}",
      a.astype(dtype),
      b.astype(dtype),
      precision=jax.lax.Precision.HIGHEST,
  )
  return (scale * d).astype(dtype)


def merged_weight(w: jax.Array, node: Any) -> jax.Array:
  """The adapted weight `W + delta` (times DoRA's `m / ||W + delta||`).

  Args:
    w: The base weight.
    node: Its adapter node.

  Returns:
    The dense adapted weight, computed in float32, in `w`'s dtype.
  """
  merged = w.astype(jnp.float32) + delta(node)
  g = out_scale(w, node)
  if g is not None:
    merged = merged * _broadcast_out(g, node.axes)
  return merged.astype(w.dtype)


def _init_one(plan: WeightPlan, config: LoraConfig,
              key: PRNGKeyArray, w: Any) -> LoraWeight:
  dtype = jnp.dtype(config.param_dtype)
  d_in = math.prod(plan.in_shape)
  if config.init == "lora":
    bound = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(
        key, plan.a_shape, dtype=jnp.float32, minval=-bound, maxval=bound
    )
  else:  # "gaussian"
    a = jax.random.normal(key, plan.a_shape, dtype=jnp.float32) / plan.rank
  b = jnp.zeros(plan.b_shape, dtype)
  node = LoraWeight(
      a=a.astype(dtype), b=b, alpha=plan.alpha, axes=plan.axes,
      rslora=config.use_rslora,
  )
  if config.use_dora:
    node = with_magnitude(w, node, path=plan.path)
  return node


def with_magnitude(w: Any, node: LoraWeight, *, path: str = "") -> LoraWeight:
  """`node` as DoRA with `m = ||W + delta||` (PEFT's DoRA init).

  Args:
    w: The base weight (an array or a tracer; not a ShapeDtypeStruct).
    node: A `LoraWeight` for it.
    path: The weight's path, for the error message.

  Returns:
    The node with `magnitude` set, so the adapted model equals `W + delta`.

  Raises:
    ValueError: If `w` is a `jax.ShapeDtypeStruct` (the norms need values).
  """
  if isinstance(w, jax.ShapeDtypeStruct):
    raise ValueError(
        f"DoRA (`use_dora=True`) initialises the magnitude of {path!r} from"
        " the weight's norms, so `lorajax.init` needs the weight values, not"
        " a jax.ShapeDtypeStruct. Call it on the params (it is jittable:"
        " `jax.jit(lambda p: lorajax.init(p, config, key=key))(params)`"
        " keeps everything on device).")
  m = dora_norm(jnp.asarray(w), node)
  return dataclasses.replace(node, magnitude=m.astype(node.b.dtype))


def _path_key(key: PRNGKeyArray, path: str) -> PRNGKeyArray:
  # A key per weight from its path, so adding or removing a target leaves
  # every other weight's initialisation unchanged.
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def init(params: PyTree, config: Any, *, key: jax.Array) -> PyTree:
  """Creates the adapter pytree for `params`.

  The result mirrors `params`: a `LoraWeight` (a `VeraWeight` for a
  `VeraConfig`) where a weight is adapted and `None` elsewhere. It works on
  arrays and on `jax.ShapeDtypeStruct` leaves, and under `jax.eval_shape` and
  `jax.jit` (only shapes are read), except for DoRA (`use_dora=True`), whose
  magnitudes start at the weights' norms and so need values.

  Args:
    params: The base parameter pytree (Flax linen params, an NNX state, a
      dict).
    config: Which weights to adapt and how: a `LoraConfig` (LoRA, rsLoRA,
      DoRA) or a `VeraConfig`.
    key: PRNG key. Each weight draws from `fold_in(key, crc32(path))`.

  Returns:
    The adapter pytree.

  Raises:
    ValueError: If `config` does not fit `params` (see `LoraConfig.plan`),
      or `config.init` is a data- or weight-driven init (use `decompose` or
      `eva_init`).

  References:
    Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".
    Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation".
  """
  from lorajax._src.core import methods  # noqa: PLC0415 (import cycle)

  if isinstance(config, methods.VeraConfig):
    return methods.init_vera(params, config, key=key)
  if not isinstance(config, LoraConfig):
    raise TypeError(
        f"`config` must be a LoraConfig or a VeraConfig; got {type(config)}.")
  if config.init not in ("lora", "gaussian"):
    raise ValueError(
        f"`init={config.init!r}` changes the base weights (or needs"
        " calibration data), so `lorajax.init`, which returns only the"
        " adapter, cannot apply it. Use `lorajax.decompose(params, config,"
        " key=key)` for 'pissa', 'pissa_niter_K' and 'olora' (it returns the"
        " residual params and the adapter), or `lorajax.eva_init(params,"
        " config, activations)` for 'eva'.")
  plans = config.plan(params)
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_is_weight_node)
  nodes = []
  for keypath, w in flat:
    plan = plans.get(paths_lib.path_str(keypath))
    nodes.append(
        None if plan is None
        else _init_one(plan, config, _path_key(key, plan.path), w)
    )
  return jax.tree_util.tree_unflatten(treedef, nodes)


def check_fit(params: PyTree, adapter: PyTree) -> None:
  """Raises a ValueError naming every weight the adapter does not fit."""
  a_flat, a_def = jax.tree_util.tree_flatten_with_path(
      adapter, is_leaf=_is_node
  )
  try:
    p_sub = a_def.flatten_up_to(params)
  except (ValueError, TypeError) as e:
    p_paths = [p for p, _ in paths_lib.leaves_with_paths(params)]
    ad_paths = [
        paths_lib.path_str(p) for p, n in a_flat if n is not None
    ]
    missing = [p for p in ad_paths if p not in set(p_paths)]
    raise ValueError(
        "The adapter's structure does not fit the params. Adapted paths"
        " missing from the params:\n"
        + paths_lib.format_paths(missing)
        + "\nParams paths:\n"
        + paths_lib.format_paths(p_paths)
        + "\nBuild the adapter with `lorajax.init(params, config, key=...)`"
        f" for these params. ({e})"
    ) from None
  errors = []
  for (keypath, node), w in zip(a_flat, p_sub):
    if node is None:
      continue
    path = paths_lib.path_str(keypath)
    if not isinstance(node, LoraWeight | VeraWeight):
      errors.append(
          f"{path!r}: expected a LoraWeight or None (or a VeraWeight); got"
          f" {type(node)}."
      )
      continue
    shape = tuple(getattr(w, "shape", ()))
    if isinstance(node, VeraWeight):
      errors += check_vera(node, shape, path)
    else:
      errors += check_node(node, shape, path)
  if errors:
    raise ValueError("The adapter does not fit the params:\n- "
                     + "\n- ".join(errors))


def check_node(node: LoraWeight, shape: tuple[int, ...], path: str
               ) -> list[str]:
  """Problems fitting one `LoraWeight` to a weight of `shape` at `path`."""
  try:
    check_axes(node.axes, shape, path)
  except ValueError as e:
    return [str(e)]
  if node.a.ndim != node.axes.count("s") + node.axes.count("i") + 1 or (
      node.b.ndim != node.axes.count("s") + node.axes.count("o") + 1
  ) or node.weight_shape != shape or node.a.shape[-1] != node.b.shape[
      node.axes.count("s")]:
    return [
        f"{path!r}: weight shape {shape} with axes {node.axes!r} does not"
        f" fit adapter a{tuple(node.a.shape)} b{tuple(node.b.shape)}."
        " Re-create the adapter for these params."
    ]
  if node.magnitude is not None:
    n_s = node.axes.count("s")
    want = tuple(node.b.shape[:n_s]) + tuple(node.b.shape[n_s + 1:])
    if tuple(node.magnitude.shape) != want:
      return [
          f"{path!r}: the DoRA magnitude has shape"
          f" {tuple(node.magnitude.shape)}; expected {want} (one entry per"
          " output unit). Re-create the adapter for these params."]
  return []


def check_vera(node: "VeraWeight", shape: tuple[int, ...], path: str
               ) -> list[str]:
  """Problems fitting one `VeraWeight` to a weight of `shape` at `path`."""
  want = (node.weight_shape, (node.rank,), shape[-1:])
  got = (shape, tuple(node.lambda_d.shape), tuple(node.lambda_b.shape))
  if len(shape) != 2 or want != got or node.b.shape[0] != node.rank:
    return [
        f"{path!r}: weight shape {shape} does not fit VeRA a"
        f"{tuple(node.a.shape)} b{tuple(node.b.shape)} lambda_d"
        f"{tuple(node.lambda_d.shape)} lambda_b"
        f"{tuple(node.lambda_b.shape)}. Re-create the adapter for these"
        " params."]
  return []


def _is_weight_node(x: Any) -> bool:
  return quant_lib.is_quantized(x) or quant_lib.is_merged(x)


def _apply(params: PyTree, adapter: PyTree, sign: float) -> PyTree:
  check_fit(params, adapter)
  if sign < 0:
    dora = [paths_lib.path_str(p) for p, n in
            jax.tree_util.tree_flatten_with_path(adapter, is_leaf=_is_node)[0]
            if isinstance(n, LoraWeight) and n.magnitude is not None]
    if dora:
      raise ValueError(
          "`unmerge` cannot undo a DoRA merge: the merged weight"
          " `m * (W + delta) / ||W + delta||` no longer holds the norm of"
          " `W + delta`, so `W` cannot be recovered from it. DoRA weights: "
          + ", ".join(dora[:4]) + (" ..." if len(dora) > 4 else "")
          + ". `merge` is pure: keep the original params and use them.")

  if sign > 0:
    n = sum(1 for x in jax.tree.leaves(params, is_leaf=_is_weight_node)
            if quant_lib.is_quantized(x))
    if n:
      warnings.warn(
          f"lorajax.merge: {n} quantized base weights are dequantized into a"
          " dense merged model (materialised in their compute dtype). The"
          " quantized base is kept, so `lorajax.unmerge` returns it bit for"
          " bit. To train or generate without a dense copy, run"
          " `lorajax.lora(fn)` on the quantized params instead.",
          quant_lib.QuantizationWarning, stacklevel=3)

  def one(node: LoraWeight | None, w: Any) -> Any:
    # `w` is an array, or a quantized / merged-quantized weight node.
    if node is None and not (quant_lib.is_quantized(w)
                             or quant_lib.is_merged(w)):
      return w
    if quant_lib.is_quantized(w):
      if sign < 0:
        raise ValueError(
            "`unmerge` got a quantized weight (shape"
            f" {w.shape}) where it expects a merged one: the params are"
            " already unmerged. Pass the output of `lorajax.merge`.")
      # Dense in the compute dtype; the base itself is kept, never
      # re-quantized, so `unmerge` can return it bit for bit.
      dense = quant_lib.dequantize(w, jnp.float32)
      if node is not None:
        dense = merged_weight(dense, node)
      return quant_lib.MergedWeight(dense.astype(w.dtype), w)
    if quant_lib.is_merged(w):
      if sign > 0:
        raise ValueError(
            "`merge` got an already merged quantized weight (shape"
            f" {w.shape}); merge into the quantized base instead.")
      return w.base
    if node is None:
      return w
    w_sh = explicit.sharding_of(w)
    if w_sh is None:
      if sign > 0:
        return merged_weight(w, node)
      return (w.astype(jnp.float32) - delta(node)).astype(w.dtype)
    # Explicit mesh: lay the factors out like the weight (whatever their own
    # sharding), so the delta comes out sharded as `w` is.
    w_entries = explicit.padded_spec(w_sh, w.ndim)
    if isinstance(node, LoraWeight):
      a_e, b_e = explicit.factor_entries(w_entries, node.axes)
      node = dataclasses.replace(
          node, a=explicit.reshard(node.a, w_sh.mesh, a_e),
          b=explicit.reshard(node.b, w_sh.mesh, b_e))
    d = explicit.reshard(delta(node), w_sh.mesh, w_entries)
    merged = w.astype(jnp.float32) + sign * d
    if sign > 0:
      g = out_scale(w, node)
      if g is not None:
        merged = merged * _broadcast_out(g, node.axes)
    return merged.astype(w.dtype)

  # The adapter is a prefix of params: mapping over it visits every weight.
  return jax.tree.map(one, adapter, params, is_leaf=_is_node)


def merge(params: PyTree, adapter: PyTree) -> PyTree:
  """Folds the adapter into the weights: `W + scale * (a contracted with b)`.

  The sum is computed in float32 and cast back to `W`'s dtype; leaves without
  an adapter are returned as they are. Pure, jittable and differentiable:
  gradients flow to `a` and `b` only when `params` is treated as constant.

  Args:
    params: The base parameter pytree.
    adapter: An adapter from `lorajax.init` for these params.

  Returns:
    A new pytree with the structure, shapes and dtypes of `params`.

  Raises:
    ValueError: If `adapter` does not fit `params`.
  """
  return _apply(params, adapter, 1.0)


def unmerge(params: PyTree, adapter: PyTree) -> PyTree:
  """Subtracts the adapter again: the inverse of `merge` up to rounding.

  Args:
    params: Merged parameters.
    adapter: The adapter that was merged into them.

  Returns:
    A new pytree with the structure, shapes and dtypes of `params`.

  Raises:
    ValueError: If `adapter` does not fit `params`.
  """
  return _apply(params, adapter, -1.0)
