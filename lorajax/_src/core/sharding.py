"""Sharded LoRA: adapter shardings, sharded init, global batches.

The adapter's shardings derive from the base weights'; the init is jitted
with explicit shardings (so is the train step, `train.py`); global batches
are assembled from each process's slice in multi-process runs.

Everything here is plain public JAX: `jax.sharding.Mesh`, `NamedSharding`,
`PartitionSpec`, `jax.jit(in_shardings=..., out_shardings=...)` and
`jax.make_array_from_process_local_data`. The same code runs on one CPU, on
simulated CPU devices, on a GPU node and on every host of a TPU pod (after
`jax.distributed.initialize()`).
"""

import re
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from lorajax._src.core import paths as paths_lib
from lorajax._src.core.adapter import LoraWeight, VeraWeight, init
from lorajax._src.core.adapter import is_node as _is_node
from lorajax._src.core.config import LoraConfig
from lorajax._src.core.typing import PyTree


def _is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, PartitionSpec | Sharding)


def _named(spec_or_sharding: Any, mesh: Mesh | None, path: str,
           ndim: int) -> NamedSharding:
  """Returns a NamedSharding for one base weight."""
  if isinstance(spec_or_sharding, NamedSharding):
    return spec_or_sharding
  if isinstance(spec_or_sharding, PartitionSpec):
    if mesh is None:
      raise ValueError(
          f"The sharding of {path!r} is a PartitionSpec"
          f" {spec_or_sharding!r}, so `mesh` is needed to build a"
          " NamedSharding. Pass `mesh=` or give NamedSharding leaves."
      )
    return NamedSharding(mesh, spec_or_sharding)
  if spec_or_sharding is None and mesh is not None:
    return NamedSharding(mesh, PartitionSpec())
  if isinstance(spec_or_sharding, Sharding):
    # A replicated or single-device sharding: read its spec if it has one.
    spec = getattr(spec_or_sharding, "spec", None)
    m = getattr(spec_or_sharding, "mesh", None)
    if spec is not None and m is not None:
      return NamedSharding(m, spec)
  raise TypeError(
      f"The sharding of {path!r} must be a NamedSharding, or a PartitionSpec"
      f" with `mesh=`; got {spec_or_sharding!r} (weight with {ndim} axes)."
  )


def _pad(spec: PartitionSpec, ndim: int, path: str) -> tuple[Any, ...]:
  entries = tuple(spec)
  if len(entries) > ndim:
    raise ValueError(
        f"The PartitionSpec {spec!r} of {path!r} has {len(entries)} entries"
        f" but the weight has {ndim} axes. Give at most one entry per axis."
    )
  return entries + (None,) * (ndim - len(entries))


def lora_specs(
    weight_spec: PartitionSpec, axes: str, path: str = "weight"
) -> tuple[PartitionSpec, PartitionSpec]:
  """The `(a, b)` PartitionSpecs for a weight with `weight_spec` and `axes`.

  `a` (`*stack, *in, rank`) takes the mesh axes of the weight's stack and
  input axes, `b` (`*stack, rank, *out`) those of its stack and output axes;
  the rank axis is replicated in both.

  Args:
    weight_spec: The base weight's PartitionSpec.
    axes: The weight's axes string (`s` stacked, `i` input, `o` output).
    path: The weight's path, for error messages.

  Returns:
    The PartitionSpecs of `a` and `b`.
  """
  entries = _pad(weight_spec, len(axes), path)
  pick = lambda c: [e for e, x in zip(entries, axes) if x == c]  # noqa: E731
  s, i, o = pick("s"), pick("i"), pick("o")
  return PartitionSpec(*s, *i, None), PartitionSpec(*s, None, *o)


def adapter_shardings(
    param_shardings: PyTree,
    adapter: PyTree,
    *,
    mesh: Mesh | None = None,
    overrides: Mapping[str, tuple[PartitionSpec, PartitionSpec]] | None = None,
) -> PyTree:
  """Derives the adapter's shardings from the base weights' shardings.

  For a weight sharded as `P(...)` with axes string `axes`, the adapter's
  `a` (`*stack, *in, rank`) takes the mesh axes of the weight's stack and
  input axes, and `b` (`*stack, rank, *out`) those of its stack and output
  axes; the rank axis is replicated. So `x @ a` needs the same collectives
  as `x @ W`, and `a` is sharded (not replicated) wherever `W` is.

  Args:
    param_shardings: A pytree mirroring the params, with a `NamedSharding` or
      a `PartitionSpec` (then pass `mesh`) per leaf, as `jax.jit`'s
      `in_shardings` takes them. `None` leaves mean replicated.
    adapter: The adapter, or its abstract version (`jax.eval_shape` of
      `lorajax.init`); only shapes and axes strings are read.
    mesh: The mesh for PartitionSpec leaves.
    overrides: Maps regexes (`re.fullmatch` on the weight's path string) to
      an `(a_spec, b_spec)` pair of PartitionSpecs that replaces the rule;
      the first matching key wins.

  Returns:
    A pytree with the structure of `adapter`: `None` where it has `None`,
    and a `LoraWeight` whose `a` and `b` are `NamedSharding`s elsewhere.
    It can be passed as `in_shardings`/`out_shardings` to `jax.jit`.

  Raises:
    ValueError: If `param_shardings` does not mirror the params the adapter
      was made for, a spec has more entries than its weight has axes, or an
      override regex matches no adapted weight or has the wrong length.
  """
  overrides = dict(overrides or {})
  compiled = []
  for k, v in overrides.items():
    try:
      rx = re.compile(k)
    except re.error as e:
      raise ValueError(
          f"`overrides` key {k!r} is not a valid regex: {e}.") from e
    if not (isinstance(v, tuple | list) and len(v) == 2 and all(
        isinstance(s, PartitionSpec) for s in v)):
      raise TypeError(
          f"`overrides[{k!r}]` must be a pair (a_spec, b_spec) of"
          f" PartitionSpecs; got {v!r}."
      )
    compiled.append((k, rx, tuple(v)))
  a_flat, a_def = jax.tree_util.tree_flatten_with_path(
      adapter, is_leaf=_is_node
  )
  try:
    s_sub = a_def.flatten_up_to(param_shardings)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "`param_shardings` must mirror the params the adapter was made for"
        " (one sharding per params leaf). Adapted weights:\n"
        + paths_lib.format_paths(
            [paths_lib.path_str(p) for p, n in a_flat if n is not None])
        + f"\n({e})"
    ) from None
  used = set()
  out: list[Any] = []
  for (keypath, node), sh in zip(a_flat, s_sub):
    if node is None:
      out.append(None)
      continue
    path = paths_lib.path_str(keypath)
    if not _is_spec_leaf(sh):
      raise TypeError(
          f"`param_shardings` at {path!r} must be a NamedSharding or a"
          f" PartitionSpec; got {type(sh).__name__}: {sh!r}."
      )
    named = _named(sh, mesh, path, len(node.axes))
    hit = next(((k, s) for k, rx, s in compiled if rx.fullmatch(path)), None)
    if hit is not None:
      used.add(hit[0])
      a_spec, b_spec = hit[1]
      for name, spec, arr in (("a", a_spec, node.a), ("b", b_spec, node.b)):
        if len(spec) > len(arr.shape):
          raise ValueError(
              f"`overrides[{hit[0]!r}]` gives {name} of {path!r} the spec"
              f" {spec!r} with {len(spec)} entries, but {name} has shape"
              f" {tuple(arr.shape)}. Give at most one entry per axis."
          )
    else:
      a_spec, b_spec = lora_specs(named.spec, node.axes, path)
    if isinstance(node, VeraWeight):
      # VeRA's vectors are tiny; the shared projections follow the weight.
      rep = NamedSharding(named.mesh, PartitionSpec())
      lam_b = NamedSharding(named.mesh, PartitionSpec(*tuple(b_spec)[1:]))
      out.append(VeraWeight(
          lambda_d=rep, lambda_b=lam_b,  # type: ignore[arg-type]
          a=NamedSharding(named.mesh, a_spec),  # type: ignore[arg-type]
          b=NamedSharding(named.mesh, b_spec),  # type: ignore[arg-type]
          seed=node.seed, axes=node.axes))
      continue
    mag = None
    if node.magnitude is not None:  # DoRA: b's spec without the rank axis.
      n_s = node.axes.count("s")
      entries = tuple(b_spec) + (None,) * (node.b.ndim - len(tuple(b_spec)))
      mag = NamedSharding(named.mesh,
                          PartitionSpec(*entries[:n_s], *entries[n_s + 1:]))
    # A pytree of shardings mirroring the adapter: LoraWeight nodes whose
    # children are NamedShardings instead of arrays.
    out.append(LoraWeight(
        a=NamedSharding(named.mesh, a_spec),
        b=NamedSharding(named.mesh, b_spec),
        alpha=node.alpha, axes=node.axes, rslora=node.rslora,
        magnitude=mag,
    ))
  unused = [k for k, _, _ in compiled if k not in used]
  if unused:
    raise ValueError(
        f"`overrides` keys {unused!r} fullmatch no adapted weight. Adapted"
        " weights:\n" + paths_lib.format_paths(
            [paths_lib.path_str(p) for p, n in a_flat if n is not None])
    )
  return jax.tree_util.tree_unflatten(a_def, out)


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree
  )


def init_sharded(
    params: PyTree,
    config: LoraConfig,
    *,
    key: jax.Array,
    param_shardings: PyTree,
    mesh: Mesh | None = None,
    overrides: Mapping[str, tuple[PartitionSpec, PartitionSpec]] | None = None,
) -> PyTree:
  """`lorajax.init`, with every adapter matrix created on its devices.

  The initialisation runs under `jax.jit` with `out_shardings` from
  `adapter_shardings`, so each device computes only its own shard and no
  host ever holds a whole matrix. The values equal `lorajax.init`'s. In a
  multi-process run every process calls it with the same `key`.

  Args:
    params: The base params, as arrays or `jax.ShapeDtypeStruct`s (only
      shapes and dtypes are read).
    config: Which weights to adapt and how.
    key: PRNG key (the same on every process).
    param_shardings: The params' shardings (see `adapter_shardings`).
    mesh: The mesh for PartitionSpec leaves in `param_shardings`.
    overrides: Per-weight `(a_spec, b_spec)` overrides (see
      `adapter_shardings`).

  Returns:
    The adapter, its `a` and `b` sharded as `adapter_shardings` says.

  Raises:
    ValueError: If `config` does not fit `params`, or the shardings do not.
  """
  abstract_params = _abstract(params)
  abstract = jax.eval_shape(
      lambda k: init(abstract_params, config, key=k), key
  )
  shardings = adapter_shardings(
      param_shardings, abstract, mesh=mesh, overrides=overrides
  )
  fn = jax.jit(
      lambda k: init(abstract_params, config, key=k), out_shardings=shardings
  )
  return fn(key)


def global_batch(local_batch: PyTree, sharding: PyTree) -> PyTree:
  """Assembles the global batch from this process's slice of it.

  Each process passes the rows it loaded (its `1/process_count` of the
  global batch, in process order along the sharded batch axis); the result
  is a global `jax.Array` per leaf, sharded as `sharding` says, without any
  host ever holding the whole batch. With one process it is `device_put`.

  Args:
    local_batch: A pytree of this process's arrays (NumPy or JAX).
    sharding: The global batch's `NamedSharding` (or a pytree of them
      mirroring `local_batch`), e.g. `NamedSharding(mesh, P("data"))`.

  Returns:
    A pytree of global `jax.Array`s.
  """
  if isinstance(sharding, Sharding):
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x),
        local_batch,
    )
  return jax.tree.map(
      lambda x, s: jax.make_array_from_process_local_data(s, x),
      local_batch, sharding,
  )
