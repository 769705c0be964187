"""The adapter pytree: `LoraWeight` nodes, `init`, `merge`, `unmerge`."""

import dataclasses
import math
import warnings
import zlib
from typing import Any

import jax
import jax.numpy as jnp

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
  """

  a: jax.Array
  b: jax.Array
  alpha: float = dataclasses.field(metadata=dict(static=True))
  axes: str = dataclasses.field(default="io", metadata=dict(static=True))
  rslora: bool = dataclasses.field(default=False,
                                   metadata=dict(static=True))

  def __init__(self, a: Any, b: Any, alpha: float | None = None,
               axes: str = "io", rslora: bool = False, *,
               scale: float | None = None):
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


def is_lora(x: Any) -> bool:
  """True for a `LoraWeight` node."""
  return isinstance(x, LoraWeight)


def is_node(x: Any) -> bool:
  """`is_leaf` for adapter trees: a `LoraWeight` or a `None` placeholder."""
  return x is None or isinstance(x, LoraWeight)


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

  Args:
    node: One adapter node.
    dtype: Dtype of the computation and of the result.

  Returns:
    An array with the shape of the adapted weight.
  """
  a_spec, b_spec, w_spec = _einsum_specs(node.axes)
  d = jnp.einsum(
      f"{a_spec},{b_spec}->{w_spec}",
      node.a.astype(dtype),
      node.b.astype(dtype),
      precision=jax.lax.Precision.HIGHEST,
  )
  return (node.scale * d).astype(dtype)


def _init_one(plan: WeightPlan, config: LoraConfig,
              key: PRNGKeyArray) -> LoraWeight:
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
  return LoraWeight(
      a=a.astype(dtype), b=b, alpha=plan.alpha, axes=plan.axes,
      rslora=config.use_rslora,
  )


def _path_key(key: PRNGKeyArray, path: str) -> PRNGKeyArray:
  # A key per weight from its path, so adding or removing a target leaves
  # every other weight's initialisation unchanged.
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def init(params: PyTree, config: LoraConfig, *, key: jax.Array) -> PyTree:
  """Creates the adapter pytree for `params`.

  The result mirrors `params`: a `LoraWeight` where a weight is adapted and
  `None` elsewhere. It works on arrays and on `jax.ShapeDtypeStruct` leaves,
  and under `jax.eval_shape` and `jax.jit` (only shapes are read).

  Args:
    params: The base parameter pytree (Flax linen params, an NNX state, a
      dict).
    config: Which weights to adapt and how.
    key: PRNG key. Each weight draws from `fold_in(key, crc32(path))`.

  Returns:
    The adapter pytree.

  Raises:
    ValueError: If `config` does not fit `params` (see `LoraConfig.plan`).

  References:
    Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".
  """
  if not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a LoraConfig; got {type(config)}.")
  plans = config.plan(params)
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_is_weight_node)
  nodes = []
  for keypath, _ in flat:
    plan = plans.get(paths_lib.path_str(keypath))
    nodes.append(
        None if plan is None
        else _init_one(plan, config, _path_key(key, plan.path))
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
    if not isinstance(node, LoraWeight):
      errors.append(
          f"{path!r}: expected a LoraWeight or None; got {type(node)}."
      )
      continue
    errors += check_node(node, tuple(getattr(w, "shape", ())), path)
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
  return []


def _is_weight_node(x: Any) -> bool:
  return quant_lib.is_quantized(x) or quant_lib.is_merged(x)


def _apply(params: PyTree, adapter: PyTree, sign: float) -> PyTree:
  check_fit(params, adapter)
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
        dense = dense + delta(node)
      return quant_lib.MergedWeight(dense.astype(w.dtype), w)
    if quant_lib.is_merged(w):
      if sign > 0:
        raise ValueError(
            "`merge` got an already merged quantized weight (shape"
            f" {w.shape}); merge into the quantized base instead.")
      return w.base
    if node is None:
      return w
    return (w.astype(jnp.float32) + sign * delta(node)).astype(w.dtype)

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
