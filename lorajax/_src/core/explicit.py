"""Support for meshes with `jax.sharding.AxisType.Explicit` axes.

On an Explicit mesh (JAX's `jax.make_mesh` default) every array's sharding is
part of its type, and an op whose result sharding JAX cannot decide raises
`ShardingTypeError` instead of leaving the choice to the compiler. lorajax
knows how the adapter must be sharded (its factors follow the base weight,
see `lorajax.adapter_shardings`), so where it computes with the factors it
annotates them: `reshard` of `a` and `b` to the weight's layout, and
`out_sharding=` on the low-rank contractions, set to the sharding of the
user's own result. On Auto meshes and unsharded values nothing here changes
the computation.
"""

from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def mesh_sharding_of(x: Any) -> NamedSharding | None:
  """`x`'s sharding type when it is on a (non-empty) mesh, else None."""
  try:
    s = jax.typeof(x).sharding
  except (TypeError, AttributeError):
    return None
  mesh = getattr(s, "mesh", None)
  if mesh is None or getattr(mesh, "empty", True):
    return None
  return s


def sharding_of(x: Any) -> NamedSharding | None:
  """`x`'s sharding type when its mesh has an Explicit axis, else None.

  Works on concrete arrays and on tracers inside `jit`.

  Args:
    x: An array or tracer.

  Returns:
    The `NamedSharding` (on an abstract mesh) or None.
  """
  s = mesh_sharding_of(x)
  if s is None or not any(t == AxisType.Explicit for t in s.mesh.axis_types):
    return None
  return s


def padded_spec(s: NamedSharding, ndim: int) -> tuple[Any, ...]:
  """The entries of `s.spec`, padded with None to `ndim` entries."""
  entries = tuple(s.spec)
  return entries + (None,) * (ndim - len(entries))


def _explicit_only(mesh: Any, entry: Any) -> Any:
  """Drops the non-Explicit mesh axes from one spec entry."""
  if entry is None or entry is PartitionSpec.UNCONSTRAINED:
    return None
  names = entry if isinstance(entry, tuple) else (entry,)
  kinds = dict(zip(mesh.axis_names, mesh.axis_types))
  kept = tuple(n for n in names if kinds.get(n) == AxisType.Explicit)
  if not kept:
    return None
  return kept if len(kept) > 1 else kept[0]


def reshard(x: jax.Array, mesh: Any, entries: tuple[Any, ...]) -> jax.Array:
  """`x` resharded to `P(*entries)` on `mesh` when that differs from now.

  Args:
    x: An array or tracer on an Explicit mesh.
    mesh: The (abstract) mesh.
    entries: One spec entry per axis of `x`.

  Returns:
    `x`, or `jax.sharding.reshard(x, NamedSharding(mesh, P(*entries)))`.
  """
  entries = tuple(_explicit_only(mesh, e) for e in entries)
  current = mesh_sharding_of(x)
  if (current is not None and current.mesh == mesh
      and padded_spec(current, x.ndim) == entries):
    return x
  return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec(*entries)))


def factor_entries(weight_entries: tuple[Any, ...], axes: str
                   ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
  """Spec entries of `a` (`*s, *i, rank`) and `b` (`*s, rank, *o`).

  Args:
    weight_entries: One spec entry per weight axis.
    axes: The weight's axes string (`s`, `i`, `o` per axis).

  Returns:
    The entries of `a` and `b`; the rank axis is replicated.
  """
  def pick(c):
    return [e for e, x in zip(weight_entries, axes) if x == c]

  s, i, o = pick("s"), pick("i"), pick("o")
  return (*s, *i, None), (*s, None, *o)


def out_sharding(like: NamedSharding | None, entries: tuple[Any, ...]
                 ) -> NamedSharding | None:
  """A `NamedSharding` on `like`'s mesh with `entries`, or None."""
  if like is None:
    return None
  mesh = like.mesh
  return NamedSharding(mesh, PartitionSpec(
      *(_explicit_only(mesh, e) for e in entries)))


_USER_HINT = (
    " [lorajax: this error comes from {where} itself, before any LoRA"
    " computation: on a mesh with Explicit axes JAX needs the model to say"
    " how an ambiguous result is sharded. Pass `out_sharding=` to that"
    " matmul/einsum (e.g. `jnp.einsum(..., out_sharding=P('data', None))`),"
    " or `jax.sharding.reshard` its inputs first (e.g. all-gather an"
    " FSDP-sharded weight with `reshard(w, P())`); or build the mesh with"
    " `axis_types=(jax.sharding.AxisType.Auto,) * ndim` to let the compiler"
    " choose. lorajax derives the adapter's shardings itself.]"
)


def is_sharding_type_error(e: BaseException) -> bool:
  """True for JAX's Explicit-mode sharding errors."""
  return type(e).__name__ in ("ShardingTypeError", "DuplicateSpecError")


def with_user_hint(e: BaseException, where: str) -> BaseException:
  """`e` again, its message extended with what the user must annotate."""
  try:
    return type(e)(f"{e}{_USER_HINT.format(where=where)}")
  except TypeError:  # pragma: no cover - an unusual constructor
    return e
