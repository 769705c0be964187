"""Many adapters on one base: adapter sets, per-example ids, combinations.

An *adapter set* stacks several LoRA adapters for the same params along a
leading slot axis. Each adapted weight holds one `LoraSetWeight` node: `a` of
shape `(slots, *stack, *in, max_rank)`, `b` of shape `(slots, *stack,
max_rank, *out)` and a per-slot `scale` vector. A slot whose true rank is
below `max_rank` is padded with zero columns of `a` and zero rows of `b`, so
the math is exact and every shape is static. `AdapterSet` pairs that array
tree (`weights`) with each slot's name, ranks and alphas.

`lora(fn)` runs `fn(params, *args)` with example `e` (or token `t`) of the
batch using the adapter of slot `ids[e]` (`ids[e, t]`): every matmul with an
adapted weight `W` computes `x @ W + scale[i] * (x @ a[i]) @ b[i]` in one
program, for every example at once. `BASE_ID` (-1) means "base model only".
It plugs into the factored interpreter as an adapter kind
(`lorajax._src.core.extend`); the interpreter itself is unchanged.
"""

import dataclasses
import math
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from lorajax._src.core import jax_compat as jc
from lorajax._src.core import paths as paths_lib
from lorajax._src.core import peft as peft_lib
from lorajax._src.core.adapter import LoraWeight, is_node
from lorajax._src.core.config import check_axes
from lorajax._src.core.extend import (
    AdapterKind,
    Factored,
    Use,
    register_adapter_kind,
)
from lorajax._src.core.factored import lora as _lora
from lorajax._src.core.typing import PyTree

BASE_ID = -1
"""The adapter id meaning "the base model only" (no adapter)."""

STRATEGIES = ("auto", "gather", "onehot", "ragged")
Strategy = Literal["auto", "gather", "onehot", "ragged"]

# -- the stacked node ----------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraSetWeight:
  """One weight's adapters for every slot of an adapter set.

  Attributes:
    a: Shape `(slots, *stack, *in, max_rank)`.
    b: Shape `(slots, *stack, max_rank, *out)`.
    scale: Shape `(slots,)`: each slot's `alpha / rank` (or `alpha /
      sqrt(rank)`); 0 for an empty slot. An array, so replacing a slot with
      an adapter of another alpha does not retrace.
    ids: None in a stored set; inside `lora` the adapter id of each example
      (shape `(batch,)`) or token (`(batch, seq)`), `BASE_ID` for none.
    axes: One letter per weight axis (`s` stacked, `i` input, `o` output).
    strategy: How `lora` computes the per-example terms (see `lora`).
  """

  a: jax.Array
  b: jax.Array
  scale: jax.Array
  ids: jax.Array | None = None
  axes: str = dataclasses.field(default="io", metadata=dict(static=True))
  strategy: str = dataclasses.field(default="auto",
                                    metadata=dict(static=True))

  @property
  def num_slots(self) -> int:
    """The number of slots."""
    return self.a.shape[0]

  @property
  def max_rank(self) -> int:
    """The padded rank."""
    return self.a.shape[-1]


def _is_set_node(x: Any) -> bool:
  return x is None or isinstance(x, LoraSetWeight)


class _SetKind(AdapterKind):
  """`LoraSetWeight` with bound ids, as a kind of the factored interpreter.

  Parts (in the interpreter's layout): `a` with mask `"si"` then (slot,
  rank) axes, `b` with mask `"so"` then (slot, rank), `scale` (slot,) and
  `ids` (the example/token axes), both with mask `""`.
  """

  name = "lora_set"

  def factored(self, node: LoraSetWeight, base: Any, path: str) -> Factored:
    axes = node.axes
    n_s = axes.count("s")
    s_ax = [j for j, c in enumerate(axes) if c == "s"]
    i_ax = [j for j, c in enumerate(axes) if c == "i"]
    o_ax = [j for j, c in enumerate(axes) if c == "o"]
    a = jnp.moveaxis(node.a, 0, -2)  # (*s, *in, slot, r)
    a_src = s_ax + i_ax
    a = jnp.transpose(a, [a_src.index(j) for j in sorted(a_src)]
                      + [len(a_src), len(a_src) + 1])
    b = jnp.moveaxis(node.b, 1 + n_s, -1)  # (slot, *s, *out, r)
    b = jnp.moveaxis(b, 0, -2)  # (*s, *out, slot, r)
    b_src = s_ax + o_ax
    b = jnp.transpose(b, [b_src.index(j) for j in sorted(b_src)]
                      + [len(b_src), len(b_src) + 1])
    assert node.ids is not None  # `check` ran first.
    return Factored(base, (a, b, node.scale, node.ids), axes,
                    ("si", "so", "", ""), self, node.strategy, path)

  def check(self, node: LoraSetWeight, shape: tuple[int, ...], path: str
            ) -> list[str]:
    try:
      check_axes(node.axes, shape, path)
    except ValueError as e:
      return [str(e)]
    axes = node.axes
    n_s = axes.count("s")
    want_a = (node.num_slots, *[d for d, c in zip(shape, axes) if c == "s"],
              *[d for d, c in zip(shape, axes) if c == "i"], node.max_rank)
    want_b = (node.num_slots, *[d for d, c in zip(shape, axes) if c == "s"],
              node.max_rank, *[d for d, c in zip(shape, axes) if c == "o"])
    errors = []
    if tuple(node.a.shape) != want_a or tuple(node.b.shape) != want_b:
      errors.append(
          f"{path!r}: weight shape {shape} (axes {axes!r}) needs set factors"
          f" a{want_a} b{want_b}; got a{tuple(node.a.shape)}"
          f" b{tuple(node.b.shape)}. Build the set for these params.")
    if tuple(node.scale.shape) != (node.num_slots,):
      errors.append(f"{path!r}: `scale` must have shape ({node.num_slots},);"
                    f" got {tuple(node.scale.shape)}.")
    if node.ids is None:
      errors.append(
          f"{path!r}: an adapter set needs per-example adapter ids; run it"
          " with `lorajax.multi.lora(fn)(params, adapter_set, ids, ...)`.")
    del n_s
    return errors

  def trainable(self, node: LoraSetWeight) -> Any:
    flags: Any = dict(a=True, b=True, scale=False,
                      ids=None if node.ids is None else False)
    return dataclasses.replace(node, **flags)

  def materialize(self, v: Factored) -> jax.Array:
    raise ValueError(
        f"{v.path!r}: a weight of an adapter set meets an op that cannot"
        " take per-example adapters (only matmuls, `dot_general`, can). The"
        " adapter set cannot be merged into one dense weight; leave this"
        " weight out of the set (use `lorajax.lora` with one adapter), or"
        " compute the op as a matmul.")

  def dot_general(self, v: Factored, use: Use) -> jax.Array | None:
    (lc, rc), (lb, rb) = jc.dot_dims(use.params)
    lhs_is_w = use.position == 0
    x = use.operands[1 - use.position]
    w_con, x_con = (lc, rc) if lhs_is_w else (rc, lc)
    w_bat = lb if lhs_is_w else rb
    if w_bat or "s" in v.roles:
      return None
    if any(v.roles[j] != "i" for j in w_con):
      return None
    a, b, scale, ids = v.parts
    names = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    wl = [next(names) for _ in v.roles]
    xs: list[Any] = [None] * x.ndim
    for xi, wi in zip(x_con, w_con):
      xs[xi] = wl[wi]
    for k in range(x.ndim):
      if xs[k] is None:
        xs[k] = next(names)
    r, sl = next(names), next(names)
    x_free_ax = [k for k in range(x.ndim) if k not in x_con]
    x_free = "".join(xs[k] for k in x_free_ax)
    free_shape = tuple(x.shape[k] for k in x_free_ax)
    if ids.ndim > len(free_shape) or tuple(ids.shape) != free_shape[
        :ids.ndim]:
      raise ValueError(
          f"{v.path!r}: adapter ids of shape {tuple(ids.shape)} do not match"
          f" the leading (example/token) axes {free_shape} of the activation"
          " multiplied with this weight. Pass one id per example"
          " `(batch,)` or per token `(batch, seq)`.")
    idl = x_free[:ids.ndim]
    w_free = "".join(wl[j] for j in range(len(wl)) if j not in w_con)
    out = w_free + x_free if lhs_is_w else x_free + w_free
    x_spec = "".join(xs)
    a_held = "".join(wl[j] for j in v.held(0))
    b_held = "".join(wl[j] for j in v.held(1))
    dtype = jnp.result_type(x.dtype, v.dtype)
    opts = jc.dot_options(use.params)
    ein = lambda spec, *ops: jnp.einsum(spec, *ops, **opts)  # noqa: E731
    a, b = a.astype(dtype), b.astype(dtype)
    x = x.astype(dtype)
    strategy = _choose(v.meta, ids, a.shape[-2])
    n_slots = a.shape[-2]
    d = None
    if strategy == "ragged":
      d = _ragged(x, x_spec, x_con, a, b, scale, ids, v, out, lhs_is_w)
      if d is None:
        strategy = "gather"
    if strategy == "onehot":
      oh = jax.nn.one_hot(ids, n_slots, dtype=dtype) * scale.astype(dtype)
      h = ein(f"{x_spec},{a_held}{sl}{r}->{x_free}{sl}{r}", x, a)
      h = ein(f"{x_free}{sl}{r},{idl}{sl}->{x_free}{sl}{r}", h, oh)
      d = ein(f"{x_free}{sl}{r},{b_held}{sl}{r}->{out}", h.astype(dtype), b)
    elif strategy == "gather":
      ids_c = jnp.maximum(ids, 0)
      sc = jnp.where(ids >= 0, scale[ids_c], 0).astype(dtype)
      a_g = jnp.take(a, ids_c, axis=-2)  # (*a_held, *ids, r)
      b_g = jnp.take(b, ids_c, axis=-2)
      h = ein(f"{x_spec},{a_held}{idl}{r}->{x_free}{r}", x, a_g)
      h = ein(f"{x_free}{r},{idl}->{x_free}{r}", h, sc)
      d = ein(f"{x_free}{r},{b_held}{idl}{r}->{out}", h.astype(dtype), b_g)
    assert d is not None
    out_dtype = use.out_aval.dtype
    return (use.base_output() + d.astype(out_dtype)).astype(out_dtype)


def _choose(strategy: str, ids: jax.Array, n_slots: int) -> str:
  """The documented choice rule for `strategy="auto"`."""
  if strategy != "auto":
    return strategy
  if ids.ndim < 2:
    return "gather"
  return "onehot" if n_slots <= 4 else "ragged"


def _ragged(x, x_spec, x_con, a, b, scale, ids, v, out, lhs_is_w):
  """Sort tokens by slot, then two `lax.ragged_dot`s (SGMV-like).

  Handles `x (*tokens, d_in) @ W (d_in, d_out)`; returns None otherwise.
  """
  if (lhs_is_w or v.roles != "io" or tuple(x_con) != (x.ndim - 1,)
      or out != x_spec[:-1] + out[-1]):
    return None
  n_slots = a.shape[-2]
  tokens = x.shape[:-1]
  n = math.prod(tokens)
  ids_t = jnp.broadcast_to(
      ids.reshape(ids.shape + (1,) * (len(tokens) - ids.ndim)), tokens)
  g = jnp.where(ids_t < 0, n_slots, ids_t).reshape(n)
  order = jnp.argsort(g)
  inv = jnp.argsort(order)
  sizes = jnp.bincount(g, length=n_slots + 1).astype(jnp.int32)
  a_s = jnp.moveaxis(a, -2, 0)  # (slot, d_in, r)
  b_s = jnp.swapaxes(jnp.moveaxis(b, -2, 0), 1, 2)  # (slot, r, d_out)
  a_s = jnp.concatenate([a_s, jnp.zeros_like(a_s[:1])], 0)
  b_s = jnp.concatenate([b_s, jnp.zeros_like(b_s[:1])], 0)
  sc = jnp.concatenate([scale, jnp.zeros((1,), scale.dtype)])
  xs = x.reshape(n, x.shape[-1])[order]
  h = lax.ragged_dot(xs, a_s, sizes)
  h = (h * sc[g[order]][:, None].astype(h.dtype)).astype(a.dtype)
  d = lax.ragged_dot(h, b_s, sizes)[inv]
  return d.reshape(*tokens, d.shape[-1])


register_adapter_kind(LoraSetWeight, _SetKind())

# -- the adapter set -----------------------------------------------------------


class SlotInfo(NamedTuple):
  """What a slot holds: its name and, per adapted weight path, its true
  `(rank, alpha, rslora)`."""

  name: str
  weights: Mapping[str, tuple[int, float, bool]]


@dataclasses.dataclass(frozen=True)
class AdapterSet:
  """Several adapters for the same params, stacked along a slot axis.

  Pass `weights` (the array pytree) to compiled code; the slot table stays
  on the host. Replacing a slot changes only arrays, never shapes, so a
  compiled program that takes `weights` is reused.

  Attributes:
    weights: A params-shaped tree with a `LoraSetWeight` at each adapted
      weight and None elsewhere.
    slots: Per slot, a `SlotInfo` or None for an empty slot.
  """

  weights: PyTree
  slots: tuple[SlotInfo | None, ...]

  @property
  def num_slots(self) -> int:
    """The number of slots (empty ones included)."""
    return len(self.slots)

  @property
  def max_rank(self) -> int:
    """The padded rank of every slot."""
    return max(n.max_rank for n in _nodes(self.weights))

  @property
  def names(self) -> tuple[str | None, ...]:
    """Each slot's name, None for an empty slot."""
    return tuple(None if s is None else s.name for s in self.slots)

  def index(self, slot: int | str) -> int:
    """The slot number of `slot` (a number or a name).

    Raises:
      KeyError: If no slot has that name or number.
    """
    if isinstance(slot, str):
      if slot not in self.names:
        raise KeyError(f"No slot named {slot!r}; slots: {self.names}.")
      return self.names.index(slot)
    if not 0 <= slot < self.num_slots:
      raise KeyError(f"Slot {slot} out of range [0, {self.num_slots}).")
    return int(slot)

  def adapter(self, slot: int | str) -> PyTree:
    """Slot `slot` as an ordinary adapter tree (`LoraWeight` nodes).

    Raises:
      KeyError: If the slot does not exist or is empty.
    """
    k = self.index(slot)
    info = self.slots[k]
    if info is None:
      raise KeyError(f"Slot {k} is empty.")

    def one(kp, node):
      if node is None:
        return None
      path = paths_lib.path_str(kp)
      if path not in info.weights:
        return None
      rank, alpha, rslora = info.weights[path]
      n_s = node.axes.count("s")
      a = node.a[k, ..., :rank]
      b = lax.slice_in_dim(node.b[k], 0, rank, axis=n_s)
      return LoraWeight(a, b, alpha, node.axes, rslora)

    return jax.tree_util.tree_map_with_path(one, self.weights,
                                            is_leaf=_is_set_node)


def _nodes(tree: PyTree) -> list[LoraSetWeight]:
  return [n for n in jax.tree.leaves(tree, is_leaf=_is_set_node)
          if n is not None]


def _flat(tree: PyTree, is_leaf) -> dict[str, Any]:
  out = {}
  for kp, node in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=is_leaf)[0]:
    if node is not None:
      out[paths_lib.path_str(kp)] = node
  return out


def _info(name: str, adapter: PyTree) -> SlotInfo:
  return SlotInfo(name, {p: (n.rank, n.alpha, n.rslora)
                         for p, n in _flat(adapter, is_node).items()})


def _pad_node(node: LoraWeight | None, like: LoraSetWeight, path: str,
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`node`'s (a, b, scale) padded to `like`'s rank (zeros when None)."""
  r_max = like.max_rank
  n_s = like.axes.count("s")
  if node is None:
    return (jnp.zeros_like(like.a[0]), jnp.zeros_like(like.b[0]),
            jnp.zeros((), like.scale.dtype))
  if node.axes != like.axes:
    raise ValueError(f"{path!r}: adapter axes {node.axes!r} differ from the"
                     f" set's {like.axes!r}.")
  if node.rank > r_max:
    raise ValueError(
        f"{path!r}: adapter rank {node.rank} exceeds the set's slot rank"
        f" {r_max}. Build the set with `max_rank={node.rank}` or more.")
  pad = r_max - node.rank
  a = jnp.pad(node.a, [(0, 0)] * (node.a.ndim - 1) + [(0, pad)])
  b = jnp.pad(node.b, [(0, 0)] * n_s + [(0, pad)]
              + [(0, 0)] * (node.b.ndim - n_s - 1))
  if a.shape != like.a.shape[1:] or b.shape != like.b.shape[1:]:
    raise ValueError(
        f"{path!r}: adapter a{tuple(node.a.shape)} b{tuple(node.b.shape)}"
        f" does not fit the set's a{tuple(like.a.shape[1:])}"
        f" b{tuple(like.b.shape[1:])} (after padding to rank {r_max}).")
  return (a.astype(like.a.dtype), b.astype(like.b.dtype),
          jnp.asarray(node.scale, like.scale.dtype))


def build(adapters: Sequence[PyTree] | Mapping[str, PyTree], *,
          max_rank: int | None = None, num_slots: int | None = None
          ) -> AdapterSet:
  """Stacks adapters for the same params into an `AdapterSet`.

  Args:
    adapters: Adapter trees (from `lorajax.init` or `lorajax.peft.load`), a
      list (slots named "0", "1", ...) or a mapping from name to adapter.
      They may adapt different weights (a slot's missing weights are zero)
      and have different ranks and alphas.
    max_rank: The slot rank (default: the largest rank given). Larger
      leaves room to hot-swap in higher-rank adapters later.
    num_slots: The number of slots (default: one per adapter); extra slots
      are empty, for `add` later without changing shapes.

  Returns:
    The set; slot `k` holds the `k`-th adapter.

  Raises:
    ValueError: If no adapter is given, axes or shapes disagree, a rank
      exceeds `max_rank`, or `num_slots` is too small.
  """
  if isinstance(adapters, Mapping):
    named = list(adapters.items())
  else:
    named = [(str(k), a) for k, a in enumerate(adapters)]
  if not named:
    raise ValueError("`build` needs at least one adapter.")
  n = len(named) if num_slots is None else num_slots
  if n < len(named):
    raise ValueError(f"`num_slots={num_slots}` is smaller than the"
                     f" {len(named)} adapters given.")
  flats = [_flat(a, is_node) for _, a in named]
  first: dict[str, LoraWeight] = {}
  for f in flats:
    for p, node in f.items():
      first.setdefault(p, node)
  if not first:
    raise ValueError("The adapters adapt no weight.")
  r_max = max(node.rank for f in flats for node in f.values())
  if max_rank is not None:
    if max_rank < r_max:
      raise ValueError(f"`max_rank={max_rank}` is below the largest adapter"
                       f" rank {r_max}.")
    r_max = max_rank
  template = named[next(p for p, f in enumerate(flats) if f)][1]

  def stacked(kp, node):
    path = paths_lib.path_str(kp)
    if path not in first:
      return None
    ref = first[path]
    n_s = ref.axes.count("s")
    a0 = jnp.zeros((n, *ref.a.shape[:-1], r_max), ref.a.dtype)
    b0 = jnp.zeros((n, *ref.b.shape[:n_s], r_max, *ref.b.shape[n_s + 1:]),
                   ref.b.dtype)
    like = LoraSetWeight(a0, b0, jnp.zeros((n,), jnp.float32),
                         axes=ref.axes)
    parts = [_pad_node(f.get(path), like, path) for f in flats]
    pad = n - len(parts)
    a = jnp.stack([p[0] for p in parts] + [like.a[0]] * pad)
    b = jnp.stack([p[1] for p in parts] + [like.b[0]] * pad)
    scale = jnp.stack([p[2] for p in parts] + [like.scale[0]] * pad)
    return LoraSetWeight(a, b, scale, axes=ref.axes)

  # Walk the union of adapted paths on the first non-empty tree's structure
  # (every adapter of the same params has it, with None where not adapted).
  union = jax.tree_util.tree_map_with_path(
      lambda kp, node: first.get(paths_lib.path_str(kp)), template,
      is_leaf=is_node)
  weights = jax.tree_util.tree_map_with_path(stacked, union, is_leaf=is_node)
  slots = tuple(_info(name, a) for name, a in named) + (None,) * (
      n - len(named))
  return AdapterSet(weights, slots)


def replace(aset: AdapterSet, slot: int | str, adapter: PyTree, *,
            name: str | None = None) -> AdapterSet:
  """A new set with slot `slot` holding `adapter` (a hot swap).

  Only arrays change (shapes and the tree structure stay), so a compiled
  program taking `aset.weights` runs the new set without retracing.

  Args:
    aset: The set.
    slot: A slot number or name (an empty slot is filled).
    adapter: An adapter tree for the same params, of rank <= `max_rank`,
      adapting only weights the set adapts.
    name: The slot's new name (default: keep it, or the slot number).

  Returns:
    The new set (`aset` is unchanged).

  Raises:
    ValueError: If the adapter does not fit (rank, shape, weights).
  """
  k = aset.index(slot)
  flat = _flat(adapter, is_node)
  set_flat = _flat(aset.weights, _is_set_node)
  extra = sorted(set(flat) - set(set_flat))
  if extra:
    raise ValueError(f"The adapter adapts weights the set does not: {extra}."
                     " Build a new set that includes them.")

  def one(kp, node):
    if node is None:
      return None
    path = paths_lib.path_str(kp)
    a, b, s = _pad_node(flat.get(path), node, path)
    return dataclasses.replace(node, a=node.a.at[k].set(a),
                               b=node.b.at[k].set(b),
                               scale=node.scale.at[k].set(s))

  weights = jax.tree_util.tree_map_with_path(one, aset.weights,
                                             is_leaf=_is_set_node)
  old = aset.slots[k]
  if name is None:
    name = old.name if old is not None else str(k)
  if name in aset.names and aset.names.index(name) != k:
    raise ValueError(f"Slot name {name!r} is already used by slot"
                     f" {aset.names.index(name)}.")
  slots = list(aset.slots)
  slots[k] = _info(name, adapter)
  return AdapterSet(weights, tuple(slots))


def add(aset: AdapterSet, adapter: PyTree, *, name: str) -> AdapterSet:
  """A new set with `adapter` in the first empty slot, or in a new slot.

  Filling an empty slot keeps every shape (no retrace); appending a slot
  changes the slot axis (a new compilation).

  Args:
    aset: The set.
    adapter: An adapter tree of rank <= `max_rank`.
    name: The new slot's name (must be new).

  Returns:
    The new set.

  Raises:
    ValueError: If the name is taken or the adapter does not fit.
  """
  if name in aset.names:
    raise ValueError(f"Slot name {name!r} is already used.")
  if None in aset.slots:
    return replace(aset, aset.slots.index(None), adapter, name=name)

  def grow(node):
    if node is None:
      return None
    return dataclasses.replace(
        node, a=jnp.concatenate([node.a, jnp.zeros_like(node.a[:1])]),
        b=jnp.concatenate([node.b, jnp.zeros_like(node.b[:1])]),
        scale=jnp.concatenate([node.scale, jnp.zeros_like(node.scale[:1])]))

  grown = AdapterSet(jax.tree.map(grow, aset.weights, is_leaf=_is_set_node),
                     (*aset.slots, None))
  return replace(grown, grown.num_slots - 1, adapter, name=name)


def remove(aset: AdapterSet, slot: int | str) -> AdapterSet:
  """A new set with slot `slot` emptied (zeros, scale 0; shapes kept).

  Its id then acts like `BASE_ID`; slot numbers of the others do not move.

  Raises:
    KeyError: If the slot does not exist.
  """
  k = aset.index(slot)

  def one(node):
    if node is None:
      return None
    return dataclasses.replace(node, a=node.a.at[k].set(0),
                               b=node.b.at[k].set(0),
                               scale=node.scale.at[k].set(0))

  slots = list(aset.slots)
  slots[k] = None
  return AdapterSet(jax.tree.map(one, aset.weights, is_leaf=_is_set_node),
                    tuple(slots))


def save(directory: str | os.PathLike, aset: AdapterSet, *,
         overwrite: bool = False, **metadata: Any) -> None:
  """Writes each non-empty slot as its own PEFT directory `directory/<name>`.

  Args:
    directory: The parent directory.
    aset: The set.
    overwrite: Replace existing slot directories.
    **metadata: Passed to `lorajax.peft.save` (e.g.
      `base_model_name_or_path`).

  Raises:
    ValueError: If a slot name is not a plain directory name.
  """
  for info in aset.slots:
    if info is None:
      continue
    if not info.name or os.sep in info.name or info.name in (".", ".."):
      raise ValueError(f"Slot name {info.name!r} is not a directory name;"
                       " rename the slot with `replace(..., name=...)`.")
  os.makedirs(directory, exist_ok=True)
  for k, info in enumerate(aset.slots):
    if info is not None:
      peft_lib.save(os.path.join(directory, info.name), aset.adapter(k),
                    overwrite=overwrite, **metadata)


def load(directories: Sequence[str | os.PathLike] | str | os.PathLike,
         params: PyTree, *, max_rank: int | None = None,
         num_slots: int | None = None) -> AdapterSet:
  """Reads PEFT directories into a set (slot names: the directory names).

  Args:
    directories: PEFT adapter directories, or one parent directory whose
      subdirectories (sorted) are the slots, as `save` writes.
    params: The base params.
    max_rank: As in `build`.
    num_slots: As in `build`.

  Returns:
    The set.
  """
  if isinstance(directories, (str, os.PathLike)):
    parent = os.fspath(directories)
    directories = [os.path.join(parent, d) for d in sorted(os.listdir(parent))
                   if os.path.isdir(os.path.join(parent, d))]
  adapters = {os.path.basename(os.path.normpath(d)): peft_lib.load(d, params)
              for d in directories}
  return build(adapters, max_rank=max_rank, num_slots=num_slots)


# -- running with per-example ids ----------------------------------------------


def bind(weights: AdapterSet | PyTree, ids: jax.Array, *,
         strategy: Strategy = "auto") -> PyTree:
  """The set's weights with `ids` attached: an adapter for `lorajax.lora`.

  `lorajax.lora(fn)(params, bind(weights, ids), *args)` equals `lora(fn)(
  params, weights, ids, *args)`; use `lora`, which also takes gradients with
  respect to `weights` cleanly (the ids stay outside the differentiated
  tree).

  Args:
    weights: An `AdapterSet` or its `weights` tree.
    ids: Integer ids, `(batch,)` or `(batch, seq)`; `BASE_ID` for none.
    strategy: See `lora`.

  Returns:
    A tree of `LoraSetWeight` nodes carrying the ids.

  Raises:
    ValueError: For an unknown strategy or non-integer ids.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"`strategy` must be one of {STRATEGIES}; got"
                     f" {strategy!r}.")
  if isinstance(weights, AdapterSet):
    weights = weights.weights
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"Adapter ids must be integers; got {ids.dtype}.")
  return jax.tree.map(
      lambda n: None if n is None else dataclasses.replace(
          n, ids=ids, strategy=strategy), weights, is_leaf=_is_set_node)


def lora(fn: Callable[..., Any], *, strategy: Strategy = "auto",
         strict: bool = False) -> Callable[..., Any]:
  """`lorajax.lora` for an adapter set with one adapter id per example.

  `lora(fn)(params, weights, ids, *args)` runs `fn(params, *args)` where
  every matmul `x @ W` with an adapted weight computes, for each example
  `e`, `x_e @ W + scale[i] * (x_e @ a[i]) @ b[i]` with `i = ids[e]` (or,
  with `ids` of shape `(batch, seq)`, per token), in one compiled program;
  `ids == BASE_ID` gives `x_e @ W`. Gradients with respect to `weights`
  reach slot `i` only from the examples with id `i`.

  The ids must index the leading axes of the activations that meet the
  adapted weights (the batch axis, then the sequence axis), and `fn` must
  treat examples independently (no batch statistics mixing examples).

  Strategies (`strategy`):
    * `"gather"`: gather each example's `a` and `b` (Punica's BGMV), then
      batched matmuls. Memory `batch * (d_in + d_out) * rank` per weight.
    * `"onehot"`: every slot's `x @ a` for every token, weighted by a one-hot
      of the ids (dense matmuls; cost grows with the number of slots).
    * `"ragged"`: sort tokens by slot and run `lax.ragged_dot` twice (SGMV
      semantics; cost proportional to tokens); for `x @ W` with a 2-D `W`,
      others use `"gather"`.
    * `"auto"` (default): `"gather"` for per-example ids; for per-token
      ids `"onehot"` with at most 4 slots, else `"ragged"`.

  Args:
    fn: As in `lorajax.lora`.
    strategy: One of the above.
    strict: As in `lorajax.lora`.

  Returns:
    `g(params, weights, ids, *args, **kwargs)`; `weights` is an
    `AdapterSet` or its `weights` tree.

  Raises:
    ValueError: When called, for ids that do not match the activations, or
      an adapted weight used by an op other than a matmul.
  """
  inner = _lora(fn, strict=strict)

  def wrapped(params: PyTree, weights: AdapterSet | PyTree, ids: jax.Array,
              *args: Any, **kwargs: Any) -> Any:
    return inner(params, bind(weights, ids, strategy=strategy), *args,
                 **kwargs)

  return wrapped


def active_slots(ids: jax.Array, num_slots: int) -> jax.Array:
  """Boolean `(num_slots,)`: which slots some example in `ids` uses."""
  ids = jnp.asarray(ids).reshape(-1)
  return jnp.zeros((num_slots,), bool).at[jnp.where(
      ids < 0, num_slots, ids)].set(True, mode="drop")


class PerSlotState(NamedTuple):
  """The per-slot optimizer state: the inner state with a leading slot
  axis on every leaf."""

  inner: Any


def per_slot(tx: optax.GradientTransformation
             ) -> optax.GradientTransformationExtraArgs:
  """Runs `tx` separately for each slot of an adapter set's weights.

  Each slot gets its own optimizer state slice (its own moments and step
  count: `tx` is vmapped over the slot axis). With `active` (see
  `active_slots`) the slots not in the batch keep their state and get zero
  updates, so momentum does not move an adapter that saw no data; the
  `scale` leaves never change. Training several adapters in one step this
  way equals training each alone.

  Args:
    tx: Any optax transformation (applied per slot).

  Returns:
    A transformation whose `update(grads, state, params=None, *,
    active=None)` takes the boolean `(num_slots,)` mask `active`.
  """

  def init(params):
    return PerSlotState(jax.vmap(tx.init)(params))

  def update(updates, state, params=None, *, active=None, **extra):
    del extra
    if params is None:
      new_u, new_s = jax.vmap(tx.update)(
          updates, state.inner)
    else:
      new_u, new_s = jax.vmap(tx.update)(updates, state.inner, params)

    def keep(new, old):
      if active is None or not hasattr(new, "shape") or new.ndim == 0:
        return new
      m = active.reshape(active.shape + (1,) * (new.ndim - 1))
      return jnp.where(m, new, old)

    if active is not None:
      new_s = jax.tree.map(keep, new_s, state.inner)
      new_u = jax.tree.map(
          lambda u: u * active.reshape(active.shape + (1,) * (u.ndim - 1)
                                       ).astype(u.dtype), new_u)
    new_u = jax.tree.map(
        lambda n: None if n is None else dataclasses.replace(
            n, scale=jnp.zeros_like(n.scale)), new_u, is_leaf=_is_set_node)
    return new_u, PerSlotState(new_s)

  return optax.GradientTransformationExtraArgs(init, update)


# -- weighted combination (PEFT add_weighted_adapter) --------------------------

Combination = Literal[
    "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear",
    "dare_ties_svd", "dare_linear_svd", "magnitude_prune",
    "magnitude_prune_svd"]
_SAME_RANK = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")


def _magnitude_prune(t: np.ndarray, density: float) -> np.ndarray:
  k = int(density * t.size)
  flat = np.abs(t).reshape(-1)
  keep = np.zeros(t.size, t.dtype)
  if k > 0:
    keep[np.argsort(-flat, kind="stable")[:k]] = 1
  return t * keep.reshape(t.shape)


def _prune(t, density, method, mask):
  if density >= 1:
    return t
  if density < 0:
    raise ValueError(f"`density` must be >= 0; got {density}.")
  if method == "magnitude":
    return _magnitude_prune(t, density)
  return t * mask / density


def _sign_mask(t: np.ndarray, method: str) -> np.ndarray:
  sign = np.sign(t)
  if method == "total":
    mag = t.sum(0)
  elif method == "frequency":
    mag = sign.sum(0)
  else:
    raise ValueError("`majority_sign_method` must be 'total' or"
                     f" 'frequency'; got {method!r}.")
  return sign == np.where(mag >= 0, 1, -1)


def _merge_tensors(ts: list[np.ndarray], w: np.ndarray, method: str,
                   density: float, sign_method: str,
                   masks: list[np.ndarray] | None) -> np.ndarray:
  """PEFT's merge_utils (task arithmetic, TIES, DARE, magnitude prune)."""
  if method in ("ties", "magnitude_prune"):
    ts = [_prune(t, density, "magnitude", None) for t in ts]
  elif method in ("dare_linear", "dare_ties"):
    assert masks is not None
    ts = [_prune(t, density, "random", m) for t, m in zip(ts, masks)]
  t = np.stack(ts)
  wt = t * w.reshape(w.shape + (1,) * (t.ndim - 1))
  if method in ("ties", "dare_ties"):
    m = _sign_mask(t, sign_method)
    return (wt * m).sum(0) / np.maximum(m.sum(0), 1.0)
  return wt.sum(0)


def add_weighted_adapter(
    adapters: Sequence[PyTree], weights: Sequence[float], *,
    combination_type: Combination = "svd", svd_rank: int | None = None,
    svd_clamp: float | None = None, density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    key: jax.Array | None = None) -> PyTree:
  """Combines adapters into one, with PEFT's `add_weighted_adapter` rules.

  With `w_k` the weights and `s_k` each adapter's scale (per weight):

  * `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` (equal
    ranks): the `a`s are merged with coefficients `sign(w_k s_k) *
    sqrt(|w_k s_k|)` and the `b`s with `sqrt(|w_k s_k|)` by task arithmetic,
    TIES (magnitude pruning to `density`, majority sign by
    `majority_sign_method`, disjoint mean), DARE (random pruning to
    `density` with rescaling by `1/density`), or magnitude pruning.
  * `cat`: `a`s concatenated along the rank (each times `w_k s_k`), `b`s
    concatenated; rank = the sum of ranks.
  * `svd` and `*_svd`: the dense deltas `s_k a_k b_k` merged as above, then
    a truncated SVD to `svd_rank` (default: the largest rank), optionally
    clamped to the `svd_clamp` quantile.

  The new adapter has `alpha = rank` (scale 1), and the `rslora` flag of the
  first adapter, as PEFT does. All adapters must have the same structure.

  Args:
    adapters: Adapter trees for the same params (`LoraWeight` nodes).
    weights: One weight per adapter.
    combination_type: As above.
    svd_rank: Rank of the SVD combinations.
    svd_clamp: Quantile for clamping the SVD factors.
    density: Fraction kept by the pruning methods (in [0, 1]).
    majority_sign_method: `"total"` or `"frequency"` (TIES, DARE-TIES).
    key: PRNG key for the DARE methods (required by them).

  Returns:
    The combined adapter tree.

  Raises:
    ValueError: For unknown types, mismatched inputs, unequal ranks where
      they must agree, or a missing `density`/`key`.
  """
  methods = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties",
             "dare_linear", "dare_ties_svd", "dare_linear_svd",
             "magnitude_prune", "magnitude_prune_svd")
  if combination_type not in methods:
    raise ValueError(f"`combination_type` must be one of {methods}; got"
                     f" {combination_type!r}.")
  if len(adapters) != len(weights) or not adapters:
    raise ValueError(f"Need one weight per adapter; got {len(adapters)}"
                     f" adapters and {len(weights)} weights.")
  if len(adapters) == 1:
    combination_type = "linear"
  base = combination_type.removesuffix("_svd")
  base = "linear" if base == "svd" else base
  if base not in ("linear", "cat") and density is None:
    raise ValueError(f"`combination_type={combination_type!r}` needs"
                     " `density`.")
  if base.startswith("dare") and key is None:
    raise ValueError(f"`combination_type={combination_type!r}` draws random"
                     " masks: pass `key=jax.random.key(...)`.")
  flats = [_flat(a, is_node) for a in adapters]
  if any(set(f) != set(flats[0]) for f in flats):
    raise ValueError("All adapters must adapt the same weights.")
  ranks = [max(n.rank for n in f.values()) for f in flats]
  if combination_type in _SAME_RANK:
    if len({n.rank for f in flats for n in f.values()}) != 1:
      raise ValueError(f"`{combination_type}` needs all adapters to have the"
                       f" same rank; got ranks {ranks}.")
    new_rank = ranks[0]
  elif combination_type == "cat":
    new_rank = sum(ranks)
  else:
    new_rank = svd_rank or max(ranks)
  rslora = next(iter(flats[0].values())).rslora
  w = np.asarray(weights, np.float64)
  dens = 1.0 if density is None else float(density)

  def dare_masks(path: str, which: int, shapes) -> list[np.ndarray] | None:
    if key is None or not base.startswith("dare"):
      return None
    return [dare_mask(key, path, which, k, s, density=dens)
            for k, s in enumerate(shapes)]

  def one(kp, _):
    path = paths_lib.path_str(kp)
    nodes = [f[path] for f in flats]
    if any(n.axes.count("s") for n in nodes):
      raise ValueError(f"{path!r}: stacked adapters cannot be combined;"
                       " combine per layer.")
    a_s = [np.asarray(n.a, np.float32) for n in nodes]
    b_s = [np.asarray(n.b, np.float32) for n in nodes]
    sc = np.asarray([n.scale for n in nodes], np.float64)
    dtype = nodes[0].a.dtype
    if combination_type == "cat":
      a = np.concatenate([a * wk * s for a, wk, s in zip(a_s, w, sc)], -1)
      b = np.concatenate(b_s, 0)
    elif combination_type in _SAME_RANK:
      ws = w * sc
      wa = np.where(ws >= 0, 1, -1) * np.sqrt(np.abs(ws))
      wb = np.sqrt(np.abs(ws))
      a = _merge_tensors(a_s, wa, base, dens, majority_sign_method,
                         dare_masks(path, 0, [x.shape for x in a_s]))
      b = _merge_tensors(b_s, wb, base, dens, majority_sign_method,
                         dare_masks(path, 1, [x.shape for x in b_s]))
    else:
      deltas = [s * (a.astype(np.float64) @ b) for a, b, s
                in zip(a_s, b_s, sc)]
      d = _merge_tensors(deltas, w, base, dens, majority_sign_method,
                         dare_masks(path, 2, [x.shape for x in deltas]))
      # PEFT factors delta^T (out, in) = U S Vh; here delta (in, out).
      u, s, vh = np.linalg.svd(d.T, full_matrices=False)
      u = u[:, :new_rank] * s[:new_rank]
      vh = vh[:new_rank]
      if svd_clamp is not None:
        hi = np.quantile(np.concatenate([u.ravel(), vh.ravel()]), svd_clamp)
        u, vh = np.clip(u, -hi, hi), np.clip(vh, -hi, hi)
      a, b = vh.T, u.T
    return LoraWeight(jnp.asarray(a, dtype), jnp.asarray(b, dtype),
                      float(a.shape[-1]), nodes[0].axes, rslora)

  return jax.tree_util.tree_map_with_path(
      lambda kp, n: None if n is None else one(kp, n), adapters[0],
      is_leaf=is_node)


def dare_mask(key: jax.Array, path: str, which: int, index: int,
              shape: tuple[int, ...], *, density: float) -> np.ndarray:
  """The DARE keep-mask `add_weighted_adapter` draws for one tensor.

  Exposed so a combination can be reproduced elsewhere: the mask of adapter
  `index`'s factor `which` (0: `a`, 1: `b`, 2: the dense delta of the
  `*_svd` types) at weight `path`, Bernoulli(`density`) from `key` folded
  with the path's CRC32, `which` and `index`.

  Args:
    key: The key given to `add_weighted_adapter`.
    path: The weight path.
    which: 0, 1 or 2 as above.
    index: The adapter's position.
    shape: The tensor's shape (lorajax layout: `a (in, r)`, `b (r, out)`).
    density: The keep probability.

  Returns:
    A float32 array of zeros and ones.
  """
  k = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
  k = jax.random.fold_in(jax.random.fold_in(k, which), index)
  u = np.asarray(jax.random.uniform(k, shape))
  return (u < density).astype(np.float32)
