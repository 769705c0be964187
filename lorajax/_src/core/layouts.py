"""Layout transfer: one function per op, shared by `lora` and `infer_axes`.

A *structural* op (transpose, reshape, broadcast, squeeze, slice, dynamic
slice, reverse, convert, gather of stacked slices) maps the axes of an adapted
weight to the axes of its result. `structural_op(name)(eqn, rest)` returns a
`StructuralOp` saying which operand axes each result axis comes from, and how
to apply the same op to any array that holds a subset of the weight's axes
(the interpreter applies it to the base and to every factor; `infer_axes`
only reads `sources`).

A *use* (dot_general, conv, ragged_dot, an embedding gather) gives every axis
of the weight operand a role: contracted axes are inputs (`i`), batch and
group axes stacked (`s`), the rest outputs (`o`). `use_roles(name)(eqn,
position)` returns those roles; `infer_axes` records them, and adapter kinds
check a weight's layout against them.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from lorajax._src.core import jax_compat as jc
from lorajax._src.core.extend import StructuralOp

Eqn = Any


def _own(x, held_in):
  """Positions of `x`'s own (non-weight) trailing axes."""
  return list(range(len(held_in), x.ndim))


def _make(eqn: Eqn, rest: Sequence[Any] | None, sources, apply_to
          ) -> StructuralOp:
  return _make_op(eqn.primitive, eqn.params, jc.in_shape(eqn),
                  tuple(jc.out_aval(eqn).shape), rest, sources, apply_to)


def _make_op(prim: Any, params: dict, in_shape: Sequence[int],
             out_shape: Sequence[int], rest: Sequence[Any] | None, sources,
             apply_to) -> StructuralOp:
  def bind_dense(w):
    return jc.bind(prim, [w, *(rest or ())], params)[0]

  return StructuralOp(
      name=prim.name, in_shape=tuple(in_shape), out_shape=tuple(out_shape),
      sources=tuple(tuple(s) for s in sources), apply_to=apply_to,
      bind_dense=bind_dense, params=params)


def _identity(eqn, rest):
  n = len(jc.in_shape(eqn))
  return _make(eqn, rest, [(j,) for j in range(n)], lambda x, hi, ho: x)


def _transpose(eqn, rest):
  perm = jc.transpose_perm(eqn.params)

  def apply_to(x, hi, ho):
    return jnp.transpose(x, [hi.index(perm[k]) for k in ho] + _own(x, hi))

  return _make(eqn, rest, [(p,) for p in perm], apply_to)


def _broadcast_in_dim(eqn, rest):
  if rest:
    return None  # Dynamic shapes.
  shape, bdims = jc.broadcast_params(eqn.params)
  sources = [()] * len(shape)
  for k, d in enumerate(bdims):
    sources[d] = (k,)

  def apply_to(x, hi, ho):
    own = _own(x, hi)
    target = [shape[k] for k in ho] + [x.shape[q] for q in own]
    dims = [ho.index(bdims[j]) for j in hi] + [len(ho) + q - len(hi)
                                               for q in own]
    return lax.broadcast_in_dim(x, target, dims)

  return _make(eqn, rest, sources, apply_to)


def reshape_groups(old: Sequence[int], new: Sequence[int]):
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


def _reshape(eqn, rest):
  sizes = jc.reshape_sizes(eqn.params)
  if rest or sizes is None:
    return None
  groups = reshape_groups(jc.in_shape(eqn), sizes)
  if groups is None:
    return None
  sources = [()] * len(sizes)
  for og, ng in groups:
    for k in ng:
      sources[k] = tuple(og)

  def apply_to(x, hi, ho):
    own = _own(x, hi)
    return jnp.reshape(x, [sizes[k] for k in ho] + [x.shape[q] for q in own])

  return _make(eqn, rest, sources, apply_to)


def _squeeze(eqn, rest):
  n = len(jc.in_shape(eqn))
  dims = {d % n for d in jc.squeeze_dims(eqn.params)}

  def apply_to(x, hi, ho):
    return lax.squeeze(x, [hi.index(j) for j in sorted(dims) if j in hi])

  return _make(eqn, rest, [(j,) for j in range(n) if j not in dims],
               apply_to)


def _slice(eqn, rest):
  start, limit, strides = jc.slice_params(eqn.params)

  def apply_to(x, hi, ho):
    own = _own(x, hi)
    return lax.slice(x, [start[j] for j in hi] + [0] * len(own),
                     [limit[j] for j in hi] + [x.shape[q] for q in own],
                     [strides[j] for j in hi] + [1] * len(own))

  return _make(eqn, rest, [(j,) for j in range(len(start))], apply_to)


def _dynamic_slice(eqn, rest):
  sizes = jc.dynamic_slice_sizes(eqn.params)
  n = len(jc.in_shape(eqn))
  if rest is not None and len(rest) != n:
    return None  # Dynamic shapes.

  def apply_to(x, hi, ho):
    own = _own(x, hi)
    zero = jnp.zeros((), jnp.asarray(rest[0]).dtype)
    return lax.dynamic_slice(x, [rest[j] for j in hi] + [zero] * len(own),
                             [sizes[j] for j in hi]
                             + [x.shape[q] for q in own])

  return _make(eqn, rest, [(j,) for j in range(n)], apply_to)


def _dynamic_slice_hint(eqn) -> dict[int, str]:
  """Axes cut to one element of several are indexed: stacked."""
  shape = jc.in_shape(eqn)
  return {j: "s" for j, s in enumerate(jc.dynamic_slice_sizes(eqn.params))
          if s == 1 and shape[j] > 1}


def _rev(eqn, rest):
  dims = jc.rev_dims(eqn.params)

  def apply_to(x, hi, ho):
    return lax.rev(x, [hi.index(j) for j in dims if j in hi])

  return _make(eqn, rest, [(j,) for j in range(len(jc.in_shape(eqn)))],
               apply_to)


# -- gathers -------------------------------------------------------------------
# A gather is recognised by its dimension numbers, not by one call pattern.
# It is a *lookup* when it takes full slices of the weight along every axis
# except the axes it indexes (`start_index_map` axes whose slice is shorter
# than the axis; other `start_index_map` axes are taken whole, as `vmap` of
# `w[i]` does) and the axes it batches over (`operand_batching_dims`, from
# `vmap` over a stacked weight). Then the same gather applied to each factor
# that holds the indexed axes (with the index-vector components of the axes
# it holds), and nothing done to the other factors, gives the factors of the
# gathered value: the indexed axes all have one role, so they live in the
# same factors. Index-vector layout, batch dims of the indices, modes `clip`
# and `promise` carry over unchanged; `fill` needs care (see `gather_use`).


class GatherPlan(NamedTuple):
  """What a gather does to the axes of its operand (see `gather_plan`).

  Attributes:
    indexed: Operand axes really indexed (slice shorter than the axis).
    batching: `operand_batching_dims`.
    batch_pos: Result positions of the indices' batch dims, in order.
    out_pos: Operand axis -> result position, for the axes kept as slices.
    paired: Operand batching axis -> its result position.
    mode: `"clip"`, `"fill"` or `"promise"`.
  """

  indexed: tuple[int, ...]
  batching: tuple[int, ...]
  batch_pos: tuple[int, ...]
  out_pos: dict[int, int]
  paired: dict[int, int]
  mode: str


def gather_plan(params: dict, in_shape: Sequence[int],
                out_shape: Sequence[int]) -> GatherPlan | None:
  """The plan of a gather that is a lookup, else None.

  A lookup indexes at least one axis, takes every axis that is neither
  indexed nor batched whole, and has a known mode.
  """
  g = jc.gather_dims(params)
  mode = jc.gather_mode(params)
  keys = g.start_index_map
  indexed = tuple(k for k in keys if g.slice_sizes[k] < in_shape[k])
  if not indexed or mode not in ("clip", "fill", "promise"):
    return None
  for j, n in enumerate(in_shape):
    if j not in keys and j not in g.operand_batching_dims and (
        g.slice_sizes[j] != n):
      return None  # A static partial slice inside the gather: rare; no.
  batch_pos = tuple(p for p in range(len(out_shape))
                    if p not in g.offset_dims)
  kept = [j for j in range(len(in_shape))
          if j not in g.collapsed_slice_dims
          and j not in g.operand_batching_dims]
  return GatherPlan(
      indexed, g.operand_batching_dims, batch_pos,
      dict(zip(kept, g.offset_dims)),
      {j: batch_pos[t] for j, t in zip(g.operand_batching_dims,
                                        g.start_indices_batching_dims)},
      mode)


def gather_op(prim: Any, params: dict, in_shape: Sequence[int],
              out_shape: Sequence[int], rest: Sequence[Any] | None, *,
              part_fill: Any = ...) -> StructuralOp | None:
  """A lookup gather as a `StructuralOp`, or None.

  Result axes that come from the indices' batch dims have the indexed axes
  as sources (a batching axis' own position has that axis); the other
  result axes come from the kept operand axes. `apply_to` gathers an array
  that holds the indexed axes (index-vector components of axes it lacks are
  dropped) and only moves axes of one that does not. `part_fill` replaces
  the fill value for `apply_to` (`...`: keep it).
  """
  plan = gather_plan(params, in_shape, out_shape)
  if plan is None:
    return None
  g = jc.gather_dims(params)
  keys = g.start_index_map
  sources: list[tuple[int, ...]] = [()] * len(out_shape)
  for p in plan.batch_pos:
    sources[p] = plan.indexed
  for j, p in (*plan.out_pos.items(), *plan.paired.items()):
    sources[p] = (j,)

  def apply_to(x, hi, ho):
    own = _own(x, hi)
    if not any(k in hi for k in plan.indexed):
      # Constant along the indexed axes: drop collapsed (size-1) axes and
      # put batching axes where their indices' batch dims go.
      sq = [hi.index(j) for j in hi if j in g.collapsed_slice_dims]
      x = lax.squeeze(x, sq) if sq else x
      pos = [plan.out_pos.get(j, plan.paired.get(j)) for j in hi
             if j not in g.collapsed_slice_dims]
    else:
      if any(j not in hi for j in plan.batching):
        raise ValueError("a factor holds the indexed axes of a gather but"
                         " not its batching axes")
      idx = rest[0]
      sel = [c for c, k in enumerate(keys) if k in hi]
      if len(sel) != len(keys):
        idx = jnp.stack([idx[..., c] for c in sel], axis=-1)
      nb = len(plan.batch_pos)
      kept_x = [j for j in hi if j in plan.out_pos]
      new = jc.with_gather_dims(
          params, offset_dims=range(nb, nb + len(kept_x) + len(own)),
          collapsed_slice_dims=[hi.index(j) for j in g.collapsed_slice_dims
                                if j in hi],
          start_index_map=[hi.index(keys[c]) for c in sel],
          operand_batching_dims=[hi.index(j) for j in plan.batching],
          slice_sizes=[g.slice_sizes[j] for j in hi]
          + [x.shape[q] for q in own], fill_value=part_fill)
      x = jc.bind(prim, [x, idx], new)[0]
      pos = [*plan.batch_pos, *(plan.out_pos[j] for j in kept_x)]
    return jnp.transpose(x, [pos.index(p) for p in ho]
                         + list(range(len(pos), x.ndim)))

  return _make_op(prim, params, in_shape, out_shape, rest, sources,
                  apply_to)


def gather_in_bounds(params: dict, in_shape: Sequence[int], idx: Any
                     ) -> Any:
  """Which windows of a `fill` gather are in bounds, `idx.shape[:-1]`.

  XLA's rule for `FILL_OR_DROP`: a window is out of bounds when any start
  index is negative or past `axis size - slice size`.
  """
  g = jc.gather_dims(params)
  ok = None
  for c, k in enumerate(g.start_index_map):
    i = idx[..., c]
    hit = (i >= 0) & (i <= in_shape[k] - g.slice_sizes[k])
    ok = hit if ok is None else ok & hit
  return ok


def _gather(eqn, rest):
  return gather_op(eqn.primitive, eqn.params, jc.in_shape(eqn),
                   tuple(jc.out_aval(eqn).shape), rest)


def gather_selects_stacked(eqn: Eqn, roles: str) -> bool:
  """True for a gather that picks slices of stacked axes (`w[expert_ids]`).

  Its result is still a weight and stays factored (a structural op). In
  `fill` mode the factors are filled like the base, which is exact only
  for a fill value of 0 or NaN (the default) and when every index-vector
  component indexes an axis held by the factors; otherwise: no.
  """
  shape = jc.in_shape(eqn)
  plan = gather_plan(eqn.params, shape, tuple(jc.out_aval(eqn).shape))
  if plan is None or any(roles[j] != "s"
                         for j in (*plan.indexed, *plan.batching)):
    return False
  if plan.mode != "fill":
    return True
  fill = jc.gather_fill_value(eqn.params)
  keys = jc.gather_dims(eqn.params).start_index_map
  return set(keys) == set(plan.indexed) and (
      fill is None or bool(np.isnan(fill)) or fill == 0)


def _gather_hint(eqn) -> dict[int, str]:
  plan = gather_plan(eqn.params, jc.in_shape(eqn),
                     tuple(jc.out_aval(eqn).shape))
  if plan is None:
    return {}
  return dict.fromkeys((*plan.indexed, *plan.batching), "s")


STRUCTURAL: dict[str, Callable[[Eqn, Sequence[Any] | None],
                               StructuralOp | None]] = {
    "convert_element_type": _identity,
    "reduce_precision": _identity,
    "transpose": _transpose,
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "squeeze": _squeeze,
    "slice": _slice,
    "dynamic_slice": _dynamic_slice,
    "rev": _rev,
    "gather": _gather,
}

HINTS: dict[str, Callable[[Eqn], dict[int, str]]] = {
    "dynamic_slice": _dynamic_slice_hint,
    "gather": _gather_hint,
}

# -- roles at uses -------------------------------------------------------------


def _dot_roles(eqn, position):
  (lc, rc), (lb, rb) = jc.dot_dims(eqn.params)
  con, bat = (lc, lb) if position == 0 else (rc, rb)
  roles = dict.fromkeys(range(len(jc.in_shape(eqn, position))), "o")
  roles.update(dict.fromkeys(con, "i"))
  roles.update(dict.fromkeys(bat, "s"))
  return roles


def ragged_roles(eqn, position):
  if position != 1:
    return None
  rd = jc.ragged_dims(eqn.params)
  (_, rc), (_, rb) = rd.dot
  roles = dict.fromkeys(range(len(jc.in_shape(eqn, 1))), "o")
  roles.update(dict.fromkeys(rc, "i"))
  roles.update(dict.fromkeys((*rb, *rd.rhs_group), "s"))
  return roles


def _conv_roles(eqn, position):
  if position != 1:
    return None
  out = jc.conv_dims(eqn.params).rhs_spec[0]
  return {j: ("o" if j == out else "i")
          for j in range(len(jc.in_shape(eqn, 1)))}


def _embedding_roles(eqn, position):
  """A 2-D table looked up along one axis: that axis is the input axis."""
  shape = jc.in_shape(eqn)
  if position != 0 or len(shape) != 2:
    return None
  plan = gather_plan(eqn.params, shape, tuple(jc.out_aval(eqn).shape))
  if plan is None or len(plan.indexed) != 1 or plan.batching:
    return None
  (k,) = plan.indexed
  return {k: "i", 1 - k: "o"}


USE_ROLES: dict[str, Callable[[Eqn, int], dict[int, str] | None]] = {
    "dot_general": _dot_roles,
    "ragged_dot_general": ragged_roles,
    "conv_general_dilated": _conv_roles,
    "gather": _embedding_roles,
}
