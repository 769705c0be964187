"""Extension points of the factored interpreter (`lorajax.lora`).

Two kinds of plug-ins run inside `lorajax.lora` without touching the
interpreter (see docs/factored_internals.md for a walk-through):

* An **adapter kind** (`AdapterKind`) says how one adapter node type (a
  frozen dataclass in the adapter pytree, like `LoraWeight`) runs factored:
  how the node and its base weight become a `Factored` value, what that value
  contributes where it meets a `dot_general`, `gather`, convolution,
  `ragged_dot` or `concatenate`, and its dense merged weight for every other
  use (a reported fallback). Register it with
  `register_adapter_kind(NodeType, kind)`. `LoraWeight` itself runs through
  this protocol (`lorajax/_src/core/lora_kind.py`).

* A **lazy base** (`LazyBase`) is a params leaf that stands for a dense
  frozen weight without being one (quantized codes and scales, say). Its
  dense shape and dtype are what `fn` is traced with; structural ops (a
  scan's slicing of the stacked axis, transposes, reshapes) are applied to it
  through `LazyBase.structural`, and it is turned into a dense array only
  right at a use (`LazyBase.use`).

Both see structural ops as `StructuralOp` values: an op on the weight,
described by how each result axis derives from the operand's axes, that can be
applied to any array holding a subset of the weight's axes (a factor, a
per-output-unit vector, a table of block scales) plus trailing axes of its
own. One `StructuralOp` builder per primitive is shared by the interpreter
and by `lorajax.infer_axes`.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from lorajax._src.core import jax_compat as jc

PyTree = Any
Primitive = Any

ROLES = "sio"  # stacked (in every factor), input (`a` side), output (`b`).


def held_axes(roles: str, mask: str) -> list[int]:
  """Axes of a weight with roles `roles` that an array with `mask` holds."""
  return [j for j, c in enumerate(roles) if c in mask]


# -- structural ops -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StructuralOp:
  """One structural op (transpose, reshape, slice, ...) on a weight.

  Attributes:
    name: The primitive's name, for messages.
    in_shape: The operand's shape.
    out_shape: The result's shape.
    sources: For each result axis, the operand axes it is made of (one for
      most ops, several where a reshape merges axes, none for an axis a
      broadcast creates).
    apply_to: `apply_to(x, held_in, held_out)` applies the op to an array
      `x` whose leading axes are the operand axes `held_in` (in order) and
      whose remaining axes are its own (a rank axis, say); it returns an
      array whose leading axes are the result axes `held_out`, followed by
      the same own axes. `held_out` must be the result axes whose sources lie
      in `held_in` (`StructuralOp.held_out` computes it from roles).
    bind_dense: Applies the op to a dense operand of shape `in_shape`.
    params: The primitive's params, for lazy bases that need more.
  """

  name: str
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  sources: tuple[tuple[int, ...], ...]
  apply_to: Callable[[jax.Array, Sequence[int], Sequence[int]], jax.Array]
  bind_dense: Callable[[jax.Array], jax.Array]
  params: Any = None

  def out_roles(self, roles: str) -> str | None:
    """The result's roles, or None where an axis mixes roles (not low-rank).

    A result axis takes the role of the operand axes it is made of (size-1
    operand axes do not count when larger ones are present); a new axis is
    an input axis (`i`), so a constant broadcast lands in the `a` factor.
    """
    out = []
    for src in self.sources:
      big = {roles[j] for j in src if self.in_shape[j] != 1}
      kinds = big or {roles[j] for j in src}
      if len(kinds) > 1:
        return None
      out.append(kinds.pop() if kinds else "i")
    return "".join(out)

  def out_origins(self, origins: Sequence[frozenset]) -> list[frozenset]:
    """`infer_axes`'s view: the original weight axes behind each result axis."""
    return [frozenset().union(*(origins[j] for j in src
                                if self.in_shape[j] != 1))
            for src in self.sources]


# -- lazy bases ---------------------------------------------------------------


class LazyBase:
  """A frozen params leaf that is not an array (e.g. quantized codes).

  Subclasses must be registered pytrees (their arrays as children), define
  `shape`, `dtype` and `dequantize`, and may override the rest.
  `lorajax.lora` traces `fn` with a `jax.ShapeDtypeStruct(shape, dtype)` in
  the leaf's place, carries the object itself through structural ops, and
  calls `use` where the weight meets a matmul-like op.
  """

  shape: tuple[int, ...]
  dtype: Any

  def dequantize(self) -> jax.Array:
    """The dense weight, of `shape` and `dtype`."""
    raise NotImplementedError

  def structural(self, op: StructuralOp) -> "LazyBase | None":
    """This leaf with `op` applied, or None to dequantize first (reported).

    Use `op.apply_to(codes, held_in, held_out)` on each stored array that
    holds whole axes of the weight, e.g. a scan slicing the stacked axis 0.
    """
    del op
    return None

  def scan_split(self) -> tuple[PyTree, Callable[[PyTree], "LazyBase"]] | None:
    """For `lax.scan` over the leading axis: `(xs, rebuild)` or None.

    `xs` is a pytree of arrays whose leading axis is the weight's axis 0;
    `rebuild(xs_slice)` is the lazy base of one slice. None dequantizes.
    """
    return None

  def use(self, prim: Primitive, params: dict, operands: Sequence[Any],
          position: int) -> list[jax.Array]:
    """Binds `prim` with `operands`, where `operands[position]` is `self`.

    The default dequantizes right here. Override it to keep the gradient
    from saving the dense dequantized weight (e.g. wrap dequantize-and-bind
    in `jax.checkpoint`) or to call a fused kernel.
    """
    ops = list(operands)
    ops[position] = self.dequantize()
    return jc.bind(prim, ops, params)


def dense(x: Any) -> jax.Array:
  """`x` itself, or a lazy base dequantized."""
  return x.dequantize() if isinstance(x, LazyBase) else x


def aval_of(x: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)


# -- factored values -----------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Factored:
  """A weight inside the interpreter: a base plus an adapter's arrays.

  Attributes:
    base: The (structurally transformed) base weight: an array or a
      `LazyBase`.
    parts: The adapter's arrays in the interpreter's layout: part `k` has
      as leading axes the weight axes whose role is in `masks[k]`, in the
      weight's current axis order, then axes of its own (LoRA: `a` holds the
      `s`/`i` axes then the rank axis, `b` the `s`/`o` axes then the rank).
    roles: One letter per axis of `base`: `s` stacked, `i` input, `o` output.
    masks: Per part, the roles whose axes it holds (`"si"`, `"so"`, `"o"`,
      `""`...).
    kind: The `AdapterKind` that made this value.
    meta: Hashable static data of the kind (LoRA: the scale).
    path: The weight's path, for messages.
  """

  base: Any
  parts: tuple[jax.Array, ...]
  roles: str = dataclasses.field(metadata=dict(static=True))
  masks: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
  kind: Any = dataclasses.field(metadata=dict(static=True))
  meta: Any = dataclasses.field(metadata=dict(static=True))
  path: str = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.base.shape)

  @property
  def dtype(self) -> Any:
    return self.base.dtype

  @property
  def ndim(self) -> int:
    return len(self.base.shape)

  def held(self, k: int) -> list[int]:
    """The weight axes part `k` holds."""
    return held_axes(self.roles, self.masks[k])

  def replace(self, **kw) -> "Factored":
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class Use:
  """A primitive applied to a factored weight (and other operands).

  Attributes:
    primitive: The primitive object.
    params: Its params (read them through `lorajax._src.core.jax_compat`).
    operands: All operands; `operands[position]` is the `Factored` weight.
    position: Where the weight is.
    out_aval: Shape and dtype of the result.
  """

  primitive: Primitive
  params: dict
  operands: tuple[Any, ...]
  position: int
  out_aval: Any

  @property
  def weight(self) -> Factored:
    return self.operands[self.position]

  def base_output(self) -> jax.Array:
    """The op on the base weight (a lazy base is dequantized at this use)."""
    base = self.weight.base
    ops = list(self.operands)
    if isinstance(base, LazyBase):
      return base.use(self.primitive, self.params, ops, self.position)[0]
    ops[self.position] = base
    return jc.bind(self.primitive, ops, self.params)[0]

  def bind(self, operands: Sequence[Any], params: dict | None = None
           ) -> jax.Array:
    """The same primitive on other (dense) operands, e.g. a factor."""
    return jc.bind(self.primitive, operands,
                   self.params if params is None else params)[0]


# -- adapter kinds -------------------------------------------------------------


class AdapterKind:
  """How one adapter node type runs in `lorajax.lora`.

  Subclass it, override what the node type supports and register an
  instance with `register_adapter_kind`. Every hook that returns None makes
  the interpreter fall back to `materialize` for that use (reported with a
  `LoraFallbackWarning`, an error under `strict=True`). Instances must be
  hashable (the default identity hash is fine): they are static pytree data.
  """

  name: str = "adapter"

  def factored(self, node: Any, base: Any, path: str) -> Factored:
    """The node and its base weight (array or `LazyBase`) as a value."""
    raise NotImplementedError

  def check(self, node: Any, shape: tuple[int, ...], path: str) -> list[str]:
    """Problems fitting `node` to a weight of `shape` (empty if it fits)."""
    del node, shape, path
    return []

  def trainable(self, node: Any) -> Any:
    """A pytree of bools with `node`'s structure: which children train."""
    return jax.tree.map(lambda _: True, node)

  def materialize(self, v: Factored) -> jax.Array:
    """The dense merged weight in `v`'s current layout (fallbacks)."""
    raise NotImplementedError

  def dot_general(self, v: Factored, use: Use) -> jax.Array | None:
    del v, use
    return None

  def gather(self, v: Factored, use: Use) -> jax.Array | None:
    del v, use
    return None

  def conv(self, v: Factored, use: Use) -> jax.Array | None:
    del v, use
    return None

  def ragged_dot(self, v: Factored, use: Use) -> jax.Array | None:
    del v, use
    return None

  def concatenate(self, use: Use) -> Factored | None:
    """`use.operands` mixes values of this kind and plain arrays."""
    del use
    return None


_KINDS: dict[type, AdapterKind] = {}


def register_adapter_kind(node_type: type, kind: AdapterKind) -> None:
  """Makes `lorajax.lora` run adapter nodes of `node_type` with `kind`.

  Args:
    node_type: The adapter node class (a registered pytree dataclass).
    kind: The `AdapterKind` instance.

  Raises:
    TypeError: If `kind` is not an `AdapterKind`.
  """
  if not isinstance(kind, AdapterKind):
    raise TypeError(f"`kind` must be an AdapterKind; got {type(kind)}.")
  _KINDS[node_type] = kind


def adapter_kind(node: Any) -> AdapterKind | None:
  """The registered kind of an adapter node, or None."""
  return _KINDS.get(type(node))


def is_adapter_node(x: Any) -> bool:
  """`is_leaf` for adapter trees: None or a node of a registered kind."""
  return x is None or type(x) in _KINDS


class _BaseOnly(AdapterKind):
  """A lazy base without an adapter: structural ops, then a dense use."""

  name = "base"

  def materialize(self, v: Factored) -> jax.Array:
    return dense(v.base)

  def dot_general(self, v, use):
    return use.base_output()

  def gather(self, v, use):
    # A row lookup (an embedding table) runs on the stored form when the
    # lazy base offers `gather_rows`; any other gather may index a stacked
    # axis: `None` lets the interpreter try it as a structural op first (so
    # `LazyBase.structural` can keep it lazy).
    rows = getattr(v.base, "gather_rows", None)
    return None if rows is None else rows(use)

  conv = ragged_dot = dot_general


BASE_ONLY = _BaseOnly()
