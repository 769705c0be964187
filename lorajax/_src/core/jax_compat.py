"""The one place where lorajax reads JAX's jaxpr representation.

`lorajax.lora` interprets jaxprs. Everything it needs from JAX beyond the
documented `jax.*` API goes through this module: the primitive objects its
rule table is keyed on, and small reader functions for the `eqn.params`
entries of those primitives (dimension numbers, a scan's `num_consts`, the
body of a call). When a JAX upgrade renames a primitive or a parameter, this
module is the only one to change, and `check_installed_jax()` (run by
`tests/test_factored_rules.py`) says exactly what moved instead of a `KeyError`
deep inside a trace.

Primitives come from `jax.extend.core.primitives` by attribute name (several
names are tried where JAX renamed one). The few primitives that module does
not export (`ragged_dot_general`, `optimization_barrier`) are taken from the
jaxpr of the public `jax.lax` function that binds them, so no private module
is imported.
"""

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
from jax.extend import core as jex

Primitive = Any  # jax.extend.core.Primitive
Eqn = Any  # jax.extend.core.JaxprEqn

# -- primitives ---------------------------------------------------------------

# Logical name -> attribute names in `jax.extend.core.primitives`, newest
# first. A logical name is what lorajax's rule table and docs call the op.
_PUBLIC = {
    "convert_element_type": ("convert_element_type_p",),
    "transpose": ("transpose_p",),
    "broadcast_in_dim": ("broadcast_in_dim_p",),
    "reshape": ("reshape_p",),
    "squeeze": ("squeeze_p",),
    "slice": ("slice_p",),
    "dynamic_slice": ("dynamic_slice_p",),
    "rev": ("rev_p",),
    "gather": ("gather_p",),
    "concatenate": ("concatenate_p",),
    "dot_general": ("dot_general_p",),
    "conv_general_dilated": ("conv_general_dilated_p",),
    "copy": ("copy_p",),
    "device_put": ("device_put_p",),
    "sharding_constraint": ("sharding_constraint_p",),
    "reduce_precision": ("reduce_precision_p",),
    "jit": ("jit_p", "pjit_p"),
    "closed_call": ("closed_call_p",),
    "remat": ("remat_p", "checkpoint_p"),
    "custom_jvp_call": ("custom_jvp_call_p",),
    "custom_vjp_call": ("custom_vjp_call_p", "custom_vjp_call_jaxpr_p"),
    "scan": ("scan_p",),
    "cond": ("cond_p",),
    "while": ("while_p",),
}


def _traced(fn: Callable[..., Any], *avals: jax.ShapeDtypeStruct):
  """The primitive of the first equation in the jaxpr of `fn(*avals)`."""
  try:
    closed = jax.make_jaxpr(fn)(*avals)
  except Exception:  # noqa: BLE001  (any failure: not this primitive)
    return None
  return closed.jaxpr.eqns[0].primitive if closed.jaxpr.eqns else None


def _sds(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


# Logical name -> a function returning the primitive from a public jax.lax
# function's jaxpr (for primitives jax.extend does not export).
_TRACED = {
    "ragged_dot_general": lambda: _traced(
        jax.lax.ragged_dot, _sds((4, 3)), _sds((2, 3, 5)),
        _sds((2,), jnp.int32)),
    "optimization_barrier": lambda: _traced(
        jax.lax.optimization_barrier, _sds((2,))),
    # Exported as `remat_p` only from JAX 0.8.
    "remat": lambda: _traced(jax.checkpoint(jnp.sin), _sds((2,))),
    "reshard": lambda: _traced_reshard(),  # noqa: PLW0108  (defined below)
    "shard_map": lambda: _traced_shard_map("shard_map"),
    "pvary": lambda: _traced_shard_map("pvary"),
    "all_gather": lambda: _traced_shard_map("all_gather"),
}

# Resolved when the installed JAX has them; their absence is not a problem.
_OPTIONAL = frozenset({"reshard"})

_PROBE_AXIS = "lorajax_probe"


def _probe_mesh(kind: str):
  """A one-axis abstract mesh to trace a probe on, or None.

  It has the size of the mesh in context (`jax.set_mesh`), if any: JAX
  refuses to switch to an abstract mesh of another size, and the primitives
  are resolved on the first `lorajax.lora` call, which may well be inside
  the user's `set_mesh`.
  """
  try:
    from jax.sharding import AxisType  # noqa: PLC0415
    cur = jax.sharding.get_abstract_mesh()
    n = 1 if cur is None or cur.empty else int(cur.size)
    return jax.sharding.AbstractMesh((n,), (_PROBE_AXIS,),
                                     axis_types=(getattr(AxisType, kind),))
  except Exception:  # noqa: BLE001  (an older JAX: no typed axes)
    return None


def _traced_reshard():
  """`reshard` binds only under a mesh with explicit axes."""
  mesh = _probe_mesh("Explicit")
  if mesh is None:
    return None
  try:
    from jax.sharding import PartitionSpec  # noqa: PLC0415
    with jax.sharding.use_abstract_mesh(mesh):
      return _traced(
          lambda x: jax.sharding.reshard(x, PartitionSpec(_PROBE_AXIS)),
          _sds((mesh.size,)))
  except Exception:  # noqa: BLE001  (an older JAX: no explicit axes)
    return None


def _traced_shard_map(name: str):
  """`shard_map`, or `pvary` / `all_gather` from inside a body."""
  mesh = _probe_mesh("Auto")
  if mesh is None:
    return None
  from jax.sharding import PartitionSpec  # noqa: PLC0415

  def body(x, w):
    g = jax.lax.all_gather(x, _PROBE_AXIS, axis=0, tiled=True)
    return x * pvary(w, (_PROBE_AXIS,)) + g[:1]

  try:
    fn = jax.shard_map(
        body, mesh=mesh, in_specs=(PartitionSpec(_PROBE_AXIS),
                                   PartitionSpec()),
        out_specs=PartitionSpec(_PROBE_AXIS))
    with jax.sharding.use_abstract_mesh(mesh):
      sds = _sds((mesh.size,))
      eqn = jax.make_jaxpr(fn)(sds, sds).jaxpr.eqns[0]
    if name == "shard_map":
      return eqn.primitive
    return next(e.primitive for e in shard_map_params(eqn.params).body.jaxpr
                .eqns if e.primitive.name == name)
  except Exception:  # noqa: BLE001  (reported by check_installed_jax)
    return None


@functools.cache
def primitives() -> dict[str, Primitive]:
  """Logical name -> primitive object, for every primitive that resolves.

  Resolved lazily (on the first call to `lorajax.lora`), so that importing
  lorajax never initialises a JAX backend.
  """
  found = {}
  from jax.extend.core import primitives as prims  # noqa: PLC0415
  for name, attrs in _PUBLIC.items():
    for attr in attrs:
      prim = getattr(prims, attr, None)
      if prim is not None:
        found[name] = prim
        break
  for name, make in _TRACED.items():
    if name in found:
      continue
    with _probe_context():
      prim = make()
    if prim is not None:
      found[name] = prim
  return found


def _probe_context():
  """Traces probes on an Auto mesh, whatever mesh the user has set: under
  an Explicit `jax.set_mesh`, some probes (`ragged_dot`) would not trace."""
  mesh = _probe_mesh("Auto")
  if mesh is None:
    return contextlib.nullcontext()
  try:
    return jax.sharding.use_abstract_mesh(mesh)
  except Exception:  # noqa: BLE001  (an older JAX)
    return contextlib.nullcontext()


def required_primitives() -> tuple[str, ...]:
  """The logical names of every primitive the rule table relies on."""
  return tuple(dict.fromkeys((*_PUBLIC, *_TRACED)))


# -- jaxpr variables and binding -----------------------------------------------


def is_literal(v: Any) -> bool:
  return isinstance(v, jex.Literal)


def is_dropvar(v: Any) -> bool:
  """True for an unused output variable (`_` in a printed jaxpr).

  `jax.extend.core.DropVar` exists only from JAX 0.10, so the class is
  recognised by name.
  """
  return type(v).__name__ == "DropVar"


def closed(j: Any) -> jex.ClosedJaxpr:
  """`j` as a ClosedJaxpr (some params hold an open Jaxpr)."""
  return j if isinstance(j, jex.ClosedJaxpr) else jex.ClosedJaxpr(j, ())


def bind(prim: Primitive, invals: Sequence[Any], params: dict) -> list[Any]:
  """Binds `prim` like `jax.core.eval_jaxpr` does; always returns a list."""
  bound = prim.get_bind_params(params)
  # Some JAX versions return `(subfuns, params)`, newer ones just the params.
  if isinstance(bound, tuple):
    subfuns, bound = bound
  else:
    subfuns = ()
  out = prim.bind(*subfuns, *invals, **bound)
  return list(out) if prim.multiple_results else [out]


def bind_eqn(eqn: Eqn, invals: Sequence[Any]) -> list[Any]:
  return bind(eqn.primitive, invals, eqn.params)


def out_aval(eqn: Eqn, k: int = 0) -> Any:
  return eqn.outvars[k].aval


def in_shape(eqn: Eqn, k: int = 0) -> tuple[int, ...]:
  return tuple(eqn.invars[k].aval.shape)


# -- parameter readers ---------------------------------------------------------
# One reader per parameter the interpreter uses. Each returns plain Python
# values (tuples of ints), never JAX's own records, except where a record is
# handed back to JAX unchanged (gather and conv dimension numbers).

DotDims = tuple[tuple[tuple[int, ...], tuple[int, ...]],
                tuple[tuple[int, ...], tuple[int, ...]]]


def dot_dims(params: dict) -> DotDims:
  """`((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))`."""
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))


def dot_options(params: dict) -> dict[str, Any]:
  """`precision` and `preferred_element_type` of a dot (or ragged dot)."""
  return {"precision": params.get("precision"),
          "preferred_element_type": params.get("preferred_element_type")}


class RaggedDims(NamedTuple):
  dot: DotDims
  lhs_ragged: tuple[int, ...]
  rhs_group: tuple[int, ...]


def ragged_dims(params: dict) -> RaggedDims:
  rd = params["ragged_dot_dimension_numbers"]
  return RaggedDims(dot_dims({"dimension_numbers": rd.dot_dimension_numbers}),
                    tuple(rd.lhs_ragged_dimensions),
                    tuple(rd.rhs_group_dimensions))


def with_ragged_dims(params: dict, dims: RaggedDims) -> dict:
  rd = params["ragged_dot_dimension_numbers"]
  new = dataclasses.replace(  # type: ignore[type-var]
      rd, dot_dimension_numbers=dims.dot,
      lhs_ragged_dimensions=dims.lhs_ragged,
      rhs_group_dimensions=dims.rhs_group) if dataclasses.is_dataclass(
          rd) else type(rd)(dims.dot, dims.lhs_ragged, dims.rhs_group)
  return dict(params, ragged_dot_dimension_numbers=new)


def with_out_sharding(params: dict, sharding: Any) -> dict:
  """`params` with `out_sharding` set (for a result of another shape than
  the equation's), where the primitive takes one; None leaves it to JAX."""
  if "out_sharding" not in params:
    return params
  return dict(params, out_sharding=sharding)


def transpose_perm(params: dict) -> tuple[int, ...]:
  return tuple(params["permutation"])


def broadcast_params(params: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """`(shape, broadcast_dimensions)`."""
  return tuple(params["shape"]), tuple(params["broadcast_dimensions"])


def reshape_sizes(params: dict) -> tuple[int, ...] | None:
  """The new shape, or None for a reshape that also permutes (old JAX)."""
  if params.get("dimensions") is not None:
    return None
  return tuple(params["new_sizes"])


def squeeze_dims(params: dict) -> tuple[int, ...]:
  return tuple(params["dimensions"])


def slice_params(params: dict) -> tuple[tuple[int, ...], ...]:
  """`(start, limit, strides)`."""
  start = tuple(params["start_indices"])
  strides = params["strides"] or (1,) * len(start)
  return start, tuple(params["limit_indices"]), tuple(strides)


def dynamic_slice_sizes(params: dict) -> tuple[int, ...]:
  return tuple(params["slice_sizes"])


def rev_dims(params: dict) -> tuple[int, ...]:
  return tuple(params["dimensions"])


def concat_dim(params: dict) -> int:
  return int(params["dimension"])


class GatherDims(NamedTuple):
  offset_dims: tuple[int, ...]
  collapsed_slice_dims: tuple[int, ...]
  start_index_map: tuple[int, ...]
  operand_batching_dims: tuple[int, ...]
  slice_sizes: tuple[int, ...]
  start_indices_batching_dims: tuple[int, ...] = ()


def gather_dims(params: dict) -> GatherDims:
  dn = params["dimension_numbers"]
  return GatherDims(tuple(dn.offset_dims), tuple(dn.collapsed_slice_dims),
                    tuple(dn.start_index_map),
                    tuple(getattr(dn, "operand_batching_dims", ())),
                    tuple(params["slice_sizes"]),
                    tuple(getattr(dn, "start_indices_batching_dims", ())))


def gather_mode(params: dict) -> str:
  """`"clip"`, `"fill"` (fill or drop), `"promise"` (in bounds) or other.

  Anything else (e.g. `ONE_HOT`) is returned by its lower-case name, which
  callers treat as unknown.
  """
  mode = params.get("mode")
  name = getattr(mode, "name", str(mode)).lower()
  return {"clip": "clip", "fill_or_drop": "fill",
          "promise_in_bounds": "promise"}.get(name, name)


def gather_fill_value(params: dict) -> Any:
  """The fill value of a `"fill"` gather (None: NaN for floats)."""
  return params.get("fill_value")


def with_gather_dims(params: dict, *, offset_dims, collapsed_slice_dims,
                     start_index_map, slice_sizes, operand_batching_dims=None,
                     fill_value: Any = ...) -> dict:
  """`params` with new dimension numbers (and optionally fill value).

  `operand_batching_dims=None` keeps the old ones (and the paired
  `start_indices_batching_dims`); `fill_value=...` keeps the old one.
  """
  kw = dict(offset_dims=tuple(offset_dims),
            collapsed_slice_dims=tuple(collapsed_slice_dims),
            start_index_map=tuple(start_index_map))
  if operand_batching_dims is not None:
    kw["operand_batching_dims"] = tuple(operand_batching_dims)
  dn = params["dimension_numbers"]._replace(**kw)
  out = dict(params, dimension_numbers=dn, slice_sizes=tuple(slice_sizes))
  if fill_value is not ...:
    out["fill_value"] = fill_value
  return out


def convert_new_dtype(params: dict) -> Any:
  """The target dtype of a `convert_element_type`."""
  return params["new_dtype"]


def reduce_precision_bits(params: dict) -> tuple[int, int]:
  """`(exponent_bits, mantissa_bits)` of a `reduce_precision`."""
  return int(params["exponent_bits"]), int(params["mantissa_bits"])


class ConvDims(NamedTuple):
  lhs_spec: tuple[int, ...]
  rhs_spec: tuple[int, ...]
  out_spec: tuple[int, ...]
  feature_group_count: int
  batch_group_count: int


def conv_dims(params: dict) -> ConvDims:
  dn = params["dimension_numbers"]
  return ConvDims(tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec),
                  int(params["feature_group_count"]),
                  int(params["batch_group_count"]))


def call_body(params: dict) -> jex.ClosedJaxpr:
  """The body of a call-like primitive (jit, closed_call, remat, custom_*)."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if key in params:
      return closed(params[key])
  raise KeyError(f"no call body among {sorted(params)}")


def remat_options(params: dict) -> dict[str, Any]:
  return {"policy": params.get("policy"),
          "prevent_cse": params.get("prevent_cse", True)}


def custom_name(params: dict) -> str:
  """`"name at file:line"` of the user function behind a custom_jvp/vjp."""
  try:
    info = call_body(params).jaxpr.debug_info
    src = getattr(info, "func_src_info", None) or getattr(info, "func_name",
                                                          None)
  except (KeyError, AttributeError):
    src = None
  return src or "<unknown function>"


class ScanParams(NamedTuple):
  num_consts: int
  num_carry: int
  body: jex.ClosedJaxpr
  length: int
  reverse: bool
  unroll: Any


def scan_params(params: dict) -> ScanParams:
  return ScanParams(int(params["num_consts"]), int(params["num_carry"]),
                    closed(params["jaxpr"]), int(params["length"]),
                    bool(params["reverse"]), params.get("unroll", 1))


def cond_branches(params: dict) -> list[jex.ClosedJaxpr]:
  return [closed(b) for b in params["branches"]]


class WhileParams(NamedTuple):
  cond_nconsts: int
  cond: jex.ClosedJaxpr
  body_nconsts: int
  body: jex.ClosedJaxpr


def while_params(params: dict) -> WhileParams:
  return WhileParams(int(params["cond_nconsts"]), closed(params["cond_jaxpr"]),
                     int(params["body_nconsts"]), closed(params["body_jaxpr"]))


class ShardMapParams(NamedTuple):
  mesh: Any
  in_specs: tuple[Any, ...]
  out_specs: tuple[Any, ...]
  body: jex.ClosedJaxpr
  manual_axes: frozenset
  check_vma: bool


def shard_map_params(params: dict) -> ShardMapParams:
  """The arguments of `jax.shard_map` a `shard_map` equation was bound with.

  `manual_axes` is `newly_manual_axes` from JAX 0.8 (`manual_axes` before);
  `check_vma` was `check_rep` in older JAX.
  """
  manual = params.get("newly_manual_axes", params.get("manual_axes"))
  if manual is None:
    raise KeyError(f"no manual axes among {sorted(params)}")
  check = params.get("check_vma", params.get("check_rep", True))
  return ShardMapParams(params["mesh"], tuple(params["in_specs"]),
                        tuple(params["out_specs"]), closed(params["jaxpr"]),
                        frozenset(manual), bool(check))


class AllGatherParams(NamedTuple):
  axes: tuple[str, ...]
  dimension: int
  tiled: bool


def all_gather_params(params: dict) -> AllGatherParams:
  names = params["axis_name"]
  names = tuple(names) if isinstance(names, (tuple, list)) else (names,)
  return AllGatherParams(names, int(params["all_gather_dimension"]),
                         bool(params["tiled"]))


def with_all_gather_dim(params: dict, dimension: int) -> dict:
  return dict(params, all_gather_dimension=dimension)


def vma(x: Any) -> frozenset:
  """The manual mesh axes `x` varies over inside a `shard_map` body.

  `aval.manual_axis_type.varying` from JAX 0.10, `aval.vma` before.
  """
  try:
    aval = jax.typeof(x)
  except (TypeError, AttributeError):
    return frozenset()
  mat = getattr(aval, "manual_axis_type", None)
  found = getattr(mat, "varying", None) if mat is not None else getattr(
      aval, "vma", None)
  return frozenset(found or ())


def pvary(x: Any, axes: tuple[str, ...]) -> Any:
  """Marks `x` as varying over the manual `axes` (no value change).

  `jax.lax.pcast(..., to="varying")` from JAX 0.8, `jax.lax.pvary` before.
  """
  if not axes:
    return x
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, axes, to="varying")
  return jax.lax.pvary(x, axes)  # type: ignore[attr-defined]


def eqn_context(eqn: Eqn) -> Any:
  """The context an equation was traced in (its abstract mesh, e.g. Auto
  inside `jax.sharding.auto_axes`, Manual inside a `shard_map` body), to
  bind it in as `jax.core.eval_jaxpr` does; a null context if JAX has none.
  """
  ctx = getattr(eqn, "ctx", None)
  manager = getattr(ctx, "manager", None)
  return manager if manager is not None else contextlib.nullcontext()


# -- the check a JAX upgrade must pass -----------------------------------------


def _examples() -> dict[str, tuple[Callable[[dict], Any], Callable, tuple]]:
  """Logical name -> (reader, function binding the primitive, arg avals)."""
  f = _sds
  w = f((3, 4))

  def custom_vjp_fn(x):
    g = jax.custom_vjp(lambda x: x * 2.0)
    g.defvjp(lambda x: (x * 2.0, None), lambda _, c: (2.0 * c,))
    return g(x)

  def custom_jvp_fn(x):
    g = jax.custom_jvp(lambda x: x * 2.0)
    g.defjvp(lambda p, t: (p[0] * 2.0, t[0] * 2.0))
    return g(x)

  scan = lambda x: jax.lax.scan(lambda c, r: (c + r, r), x[0], x)[0]  # noqa
  probe = _probe_mesh("Auto")
  n = 1 if probe is None else probe.size

  def shard_map_fn(x, w):
    from jax.sharding import PartitionSpec  # noqa: PLC0415
    spec = PartitionSpec(None, _PROBE_AXIS)
    with jax.sharding.use_abstract_mesh(probe):
      return jax.shard_map(
          lambda y, v: y * pvary(v, (_PROBE_AXIS,))[:, None] + jax.lax
          .all_gather(y, _PROBE_AXIS, axis=1, tiled=True)[:, :1], mesh=probe,
          in_specs=(spec, PartitionSpec()), out_specs=spec)(x, w)
  return {
      "dot_general": (lambda p: (dot_dims(p), dot_options(p)),
                      lambda x, y: jax.lax.dot_general(
                          x, y, (((1,), (0,)), ((), ()))),
                      (w, f((4, 2)))),
      "ragged_dot_general": (ragged_dims, jax.lax.ragged_dot,
                             (f((4, 3)), f((2, 3, 5)), f((2,), jnp.int32))),
      "transpose": (transpose_perm, lambda x: x.T, (w,)),
      "broadcast_in_dim": (broadcast_params,
                           lambda x: jax.lax.broadcast_in_dim(
                               x, (2, 3, 4), (1, 2)), (w,)),
      "reshape": (reshape_sizes, lambda x: x.reshape(12), (w,)),
      "squeeze": (squeeze_dims, lambda x: jax.lax.squeeze(x, (0,)),
                  (f((1, 4)),)),
      "slice": (slice_params, lambda x: x[1:], (w,)),
      "dynamic_slice": (dynamic_slice_sizes,
                        lambda x, i: jax.lax.dynamic_slice(x, (i, 0), (1, 4)),
                        (w, f((), jnp.int32))),
      "rev": (rev_dims, lambda x: jax.lax.rev(x, (0,)), (w,)),
      "concatenate": (concat_dim, lambda x: jnp.concatenate([x, x], 1), (w,)),
      "gather": (lambda p: (gather_dims(p), gather_mode(p),
                            gather_fill_value(p), with_gather_dims(
          p, offset_dims=(1,), collapsed_slice_dims=(0,),
          start_index_map=(0,), slice_sizes=(1, 4),
          operand_batching_dims=(), fill_value=0.0)),
                 lambda x, i: x.at[i].get(mode="fill", fill_value=1.0),
                 (w, f((5,), jnp.int32))),
      "convert_element_type": (convert_new_dtype,
                               lambda x: x.astype(jnp.bfloat16), (w,)),
      "reduce_precision": (reduce_precision_bits,
                           lambda x: jax.lax.reduce_precision(x, 5, 2),
                           (w,)),
      "conv_general_dilated": (conv_dims, lambda x, k: jax.lax.conv(
          x, k, (1,), "SAME"), (f((1, 2, 5)), f((3, 2, 3)))),
      "jit": (call_body, jax.jit(lambda x: x + 1), (w,)),
      "remat": (lambda p: (call_body(p), remat_options(p)),
                jax.checkpoint(lambda x: x + 1), (w,)),
      "custom_jvp_call": (lambda p: (call_body(p), custom_name(p)),
                          custom_jvp_fn, (w,)),
      "custom_vjp_call": (lambda p: (call_body(p), custom_name(p)),
                          custom_vjp_fn, (w,)),
      "scan": (scan_params, scan, (w,)),
      "cond": (cond_branches, lambda x: jax.lax.cond(
          True, lambda: x, lambda: -x), (w,)),
      "shard_map": (shard_map_params, shard_map_fn, (f((3, n)), f((3,)))),
      "pvary": (dict, shard_map_fn, (f((3, n)), f((3,)))),
      "all_gather": (all_gather_params, shard_map_fn, (f((3, n)), f((3,)))),
      "while": (while_params, lambda x: jax.lax.while_loop(
          lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1]), (0, x)), (w,)),
  }


def check_installed_jax() -> list[str]:
  """Every mismatch between the installed JAX and what lorajax relies on.

  Returns:
    One line per problem: a primitive that no longer resolves, or a
    parameter reader that fails on a freshly traced example of its primitive
    (a renamed or restructured `eqn.params` entry). Empty when all is well.
  """
  problems = []
  prims = primitives()
  for name in required_primitives():
    if name not in prims and name not in _OPTIONAL:
      where = ("jax.extend.core.primitives." + " or ".join(_PUBLIC[name])
               if name in _PUBLIC else "")
      if name in _TRACED:
        where += (" or " if where else "") + "the jaxpr of its jax function"
      problems.append(f"primitive {name!r} not found in {where} (JAX"
                      f" {jax.__version__})")
  for name, (reader, fn, avals) in _examples().items():
    eqns = []
    try:
      with _probe_context():
        closed_example = jax.make_jaxpr(fn)(*avals)
      eqns = [e for e in _all_eqns(closed_example.jaxpr)
              if e.primitive is prims.get(name)]
      if not eqns:
        problems.append(f"tracing an example of {name!r} did not bind the"
                        " resolved primitive object")
        continue
      reader(eqns[0].params)
    except Exception as e:  # noqa: BLE001  (reported, not raised)
      problems.append(f"reading the params of {name!r} failed with"
                      f" {type(e).__name__}: {e} (params:"
                      f" {sorted(eqns[0].params) if eqns else '?'})")
  return problems


def jaxprs_in_params(params: dict) -> list[jex.Jaxpr]:
  """The jaxprs among a primitive's params (`jax.extend.core` has this
  function only from JAX 0.8)."""
  out = []
  for v in params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(x, jex.ClosedJaxpr):
        out.append(x.jaxpr)
      elif isinstance(x, jex.Jaxpr):
        out.append(x)
  return out


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jaxprs_in_params(eqn.params):
      yield from _all_eqns(sub)
