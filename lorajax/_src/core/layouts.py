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
from typing import Any

import jax.numpy as jnp
from jax import lax

from lorajax._src.core import jax_compat as jc
from lorajax._src.core.extend import StructuralOp

Eqn = Any


def _own(x, held_in):
  """Positions of `x`'s own (non-weight) trailing axes."""
  return list(range(len(held_in), x.ndim))


def _make(eqn: Eqn, rest: Sequence[Any] | None, sources, apply_to
          ) -> StructuralOp:
  def bind_dense(w):
    return jc.bind_eqn(eqn, [w, *(rest or ())])[0]

  return StructuralOp(
      name=eqn.primitive.name, in_shape=jc.in_shape(eqn),
      out_shape=tuple(jc.out_aval(eqn).shape),
      sources=tuple(tuple(s) for s in sources), apply_to=apply_to,
      bind_dense=bind_dense, params=eqn.params)


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


def _gather(eqn, rest):
  """Indexing into stacked axes only (`w[expert_ids]`): a structural op."""
  g = jc.gather_dims(eqn.params)
  shape = jc.in_shape(eqn)
  keys = g.start_index_map
  if (g.operand_batching_dims or not keys
      or set(g.collapsed_slice_dims) != set(keys)
      or any(g.slice_sizes[j] != shape[j] for j in range(len(shape))
             if j not in keys)):
    return None
  kept = [j for j in range(len(shape)) if j not in keys]
  n_out = len(jc.out_aval(eqn).shape)
  batch_pos = [p for p in range(n_out) if p not in g.offset_dims]
  out_pos = dict(zip(kept, g.offset_dims))  # operand axis -> result axis
  sources = [tuple(keys)] * n_out
  for j in kept:
    sources[out_pos[j]] = (j,)

  def apply_to(x, hi, ho):
    if not any(k in hi for k in keys):
      return x  # Constant along the indexed axes.
    own = _own(x, hi)
    nb = len(batch_pos)
    kept_x = [j for j in hi if j not in keys]
    params = jc.with_gather_dims(
        eqn.params,
        offset_dims=range(nb, nb + len(kept_x) + len(own)),
        collapsed_slice_dims=[hi.index(k) for k in g.collapsed_slice_dims],
        start_index_map=[hi.index(k) for k in keys],
        slice_sizes=[g.slice_sizes[j] for j in hi]
        + [x.shape[q] for q in own])
    y = jc.bind(eqn.primitive, [x, rest[0]], params)[0]
    pos = batch_pos + [out_pos[j] for j in kept_x]
    return jnp.transpose(y, [pos.index(p) for p in ho]
                         + list(range(len(pos), y.ndim)))

  return _make(eqn, rest, sources, apply_to)


def _gather_hint(eqn) -> dict[int, str]:
  return dict.fromkeys(jc.gather_dims(eqn.params).collapsed_slice_dims, "s")


STRUCTURAL: dict[str, Callable[[Eqn, Sequence[Any] | None],
                               StructuralOp | None]] = {
    "convert_element_type": _identity,
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
  if position != 0 or len(jc.in_shape(eqn)) != 2:
    return None
  if jc.gather_dims(eqn.params).collapsed_slice_dims != (0,):
    return None
  return {0: "i", 1: "o"}


USE_ROLES: dict[str, Callable[[Eqn, int], dict[int, str] | None]] = {
    "dot_general": _dot_roles,
    "ragged_dot_general": ragged_roles,
    "conv_general_dilated": _conv_roles,
    "gather": _embedding_roles,
}
