"""`LoraWeight` as an adapter kind of the factored interpreter.

The value of an adapted weight is `base + scale * sum_r a[..., r] * b[..., r]`
with `a` holding the weight's stacked and input axes (mask `"si"`) and `b` its
stacked and output axes (mask `"so"`), each followed by the rank axis. Each
hook below computes `op(x, base) + scale * op(op(x, a), b)` with the op's own
dimension numbers, so `a @ b` and the dense weight gradient never appear.
"""

import math
import string
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lorajax._src.core import explicit, layouts
from lorajax._src.core import jax_compat as jc
from lorajax._src.core.adapter import LoraWeight, check_node
from lorajax._src.core.extend import (
    AdapterKind,
    Factored,
    Use,
    dense,
    held_axes,
    register_adapter_kind,
)
from lorajax._src.core.typing import Array, Float

MASKS = ("si", "so")


def _letters():
  return iter(string.ascii_letters)


class LoraKind(AdapterKind):
  """Plain LoRA: `W + scale * a @ b` (Hu et al. 2021)."""

  name = "lora"

  def factored(self, node: LoraWeight, base: Any, path: str) -> Factored:
    if node.magnitude is not None:  # DoRA: its own kind (method_kinds.py).
      from lorajax._src.core.method_kinds import DORA  # noqa: PLC0415
      return DORA.factored(node, base, path)
    axes = node.axes
    s_ax = [j for j, c in enumerate(axes) if c == "s"]
    i_ax = [j for j, c in enumerate(axes) if c == "i"]
    o_ax = [j for j, c in enumerate(axes) if c == "o"]
    # node.a is (*stack, *in, r) and node.b (*stack, r, *out); reorder both
    # to the weight's axis order with the rank axis last.
    a_src = s_ax + i_ax
    a = jnp.transpose(node.a, [a_src.index(j) for j in sorted(a_src)]
                      + [len(a_src)])
    b = jnp.moveaxis(node.b, len(s_ax), -1)
    b_src = s_ax + o_ax
    b = jnp.transpose(b, [b_src.index(j) for j in sorted(b_src)]
                      + [len(b_src)])
    return self.refit(
        Factored(base, (a, b), axes, MASKS, self, float(node.scale), path))

  def refit(self, v: Factored) -> Factored:
    """On an Explicit mesh, lays `a` and `b` out like `v.base`.

    `a` takes the base's spec entries on the axes it holds, `b` on its own;
    the rank axis is replicated. A no-op unless the base or a factor is on a
    mesh with Explicit axes (or the base is not an array).
    """
    if not isinstance(v.base, jax.Array | jax.core.Tracer):
      return v
    sh = explicit.mesh_sharding_of(v.base)
    if sh is None or not any(
        explicit.sharding_of(x) is not None for x in (v.base, *v.parts)):
      return v
    entries = explicit.padded_spec(sh, v.ndim)
    a, b = v.parts
    a_e = (*(entries[j] for j in v.held(0)), None)
    b_e = (*(entries[j] for j in v.held(1)), None)
    return v.replace(parts=(explicit.reshard(a, sh.mesh, a_e),
                            explicit.reshard(b, sh.mesh, b_e)))

  def check(self, node, shape, path):
    return check_node(node, shape, path)

  # -- dense forms (fallbacks) -------------------------------------------------

  def delta(self, v: Factored, dtype: Any = jnp.float32) -> jax.Array:
    """The dense `scale * a @ b` in `v`'s current layout."""
    a, b = v.parts
    names = _letters()
    w = [next(names) for _ in v.roles]
    r = next(names)
    a_spec = "".join(w[j] for j in v.held(0)) + r
    b_spec = "".join(w[j] for j in v.held(1)) + r
    d = jnp.einsum(f"{a_spec},{b_spec}->{''.join(w)}", a.astype(jnp.float32),
                   b.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return (v.meta * d).astype(dtype)

  def materialize(self, v: Factored) -> jax.Array:
    base = dense(v.base)
    d = self.delta(self.refit(v))
    sh = explicit.sharding_of(base)
    if sh is not None:
      d = explicit.reshard(d, sh.mesh, explicit.padded_spec(sh, base.ndim))
    return (base.astype(jnp.float32) + d).astype(base.dtype)

  # -- factored uses --

  def dot_general(self, v: Factored, use: Use) -> jax.Array:
    (lc, rc), (lb, rb) = jc.dot_dims(use.params)
    lhs_is_w = use.position == 0
    x = use.operands[1 - use.position]
    w_con, x_con = (lc, rc) if lhs_is_w else (rc, lc)
    w_bat, x_bat = (lb, rb) if lhs_is_w else (rb, lb)
    names = _letters()
    wl = [next(names) for _ in v.roles]
    xs: list[Any] = [None] * x.ndim
    for xi, wi in zip(x_con + x_bat, w_con + w_bat):
      xs[xi] = wl[wi]
    for k in range(x.ndim):
      if xs[k] is None:
        xs[k] = next(names)
    r = next(names)
    batch = "".join(wl[j] for j in w_bat)
    w_free = "".join(wl[j] for j in range(len(wl))
                     if j not in w_con and j not in w_bat)
    x_free = "".join(xs[k] for k in range(x.ndim)
                     if k not in x_con and k not in x_bat)
    out = batch + (w_free + x_free if lhs_is_w else x_free + w_free)
    base_out = use.base_output()
    a, b = v.parts
    a_spec = "".join(wl[j] for j in v.held(0)) + r
    b_spec = "".join(wl[j] for j in v.held(1)) + r
    dtype = jnp.result_type(x.dtype, v.dtype)
    opts = jc.dot_options(use.params)
    out_sharding = explicit.sharding_of(base_out)
    try:
      delta = low_rank_contract(
          "".join(xs), x.astype(dtype), a_spec, a.astype(dtype), b_spec,
          b.astype(dtype), out, scale=v.meta, out_sharding=out_sharding,
          **opts)
    except Exception as e:
      if out_sharding is None or not explicit.is_sharding_type_error(e):
        raise
      raise type(e)(
          f"lorajax.lora: on a mesh with Explicit axes, the low-rank term"
          f" of {v.path!r} (x @ a @ b, with a {jax.typeof(a)} and b"
          f" {jax.typeof(b)} laid out like the weight"
          f" {jax.typeof(v.base)}) cannot produce this matmul's result"
          f" sharding {out_sharding.spec} from activations"
          f" {jax.typeof(x)}: {e} Annotate the matmul in your model: pass"
          " `out_sharding=` to it, or `jax.sharding.reshard` the weight or"
          " the activations first so that their contracted axes are"
          " sharded alike."
      ) from e
    out_dtype = use.out_aval.dtype
    return (base_out + delta.astype(out_dtype)).astype(out_dtype)

  def gather(self, v: Factored, use: Use) -> jax.Array | None:
    """An embedding lookup: rows of `W`, plus `scale * (rows of a) @ b`."""
    return lookup(v, use)

  def conv(self, v: Factored, use: Use) -> jax.Array | None:
    """A conv to `rank` channels with `a` as kernel, then `b` as a 1x1 conv."""
    if use.position != 1:
      return None
    c = jc.conv_dims(use.params)
    if c.feature_group_count != 1 or c.batch_group_count != 1:
      return None
    rhs_out = c.rhs_spec[0]
    if v.roles[rhs_out] != "o" or v.roles.count("o") != 1 or "s" in v.roles:
      return None
    a, b = v.parts
    x = use.operands[0]
    base_out = use.base_output()
    kernel_a = jnp.moveaxis(a, -1, rhs_out).astype(x.dtype)
    feat = c.out_spec[1]
    # Explicit mesh: the rank-channel result is laid out like the user's
    # result with its feature axis replicated; the 1x1 conv gives the
    # user's result sharding.
    out_sh = explicit.sharding_of(base_out)
    h_sh = d_sh = None
    if out_sh is not None:
      entries = list(explicit.padded_spec(out_sh, base_out.ndim))
      f_entry = entries[feat]
      entries[feat] = None
      h_sh = explicit.out_sharding(out_sh, tuple(entries))
      del entries[feat]
      d_sh = explicit.out_sharding(out_sh, (*entries, f_entry))
    h = use.bind([x, kernel_a], jc.with_out_sharding(use.params, h_sh))
    d = jnp.einsum("...r,or->...o", jnp.moveaxis(h, feat, -1),
                   b.astype(h.dtype), out_sharding=d_sh)
    return base_out + jnp.moveaxis(v.meta * d, -1, feat).astype(
        base_out.dtype)

  def ragged_dot(self, v: Factored, use: Use) -> jax.Array | None:
    """Grouped (MoE) matmul with an expert-stacked weight, per expert.

    `ragged_dot(x, W, groups) + scale * ragged_dot(ragged_dot(x, a, groups),
    b, groups)`: each token goes through its expert's own `a` and `b` (B per
    expert). The weight's group axes must be stacked (`s`), its contracted
    axes inputs (`i`) and its other axes outputs (`o`).
    """
    if use.position != 1:
      return None
    rd = jc.ragged_dims(use.params)
    (lc, rc), (lb, rb) = rd.dot
    if lb or rb or not rd.rhs_group:
      return None
    if any(c in lc for c in rd.lhs_ragged):
      return None  # Ragged contraction (a weight-gradient form): no.
    for j, role in enumerate(v.roles):
      want = "s" if j in rd.rhs_group else "i" if j in rc else "o"
      if role != want:
        return None
    x, groups = use.operands[0], use.operands[2]
    a, b = v.parts
    ha, hb = v.held(0), v.held(1)
    dtype = jnp.result_type(x.dtype, v.dtype)
    base_out = use.base_output()
    # On an Explicit mesh (where JAX cannot infer a ragged_dot's result
    # sharding) `x . a` is laid out like the result on x's free axes, with
    # the rank axis replicated.
    out_sh = explicit.sharding_of(base_out)
    h_sh = None
    if out_sh is not None:
      n_free = x.ndim - len(lc)
      h_sh = explicit.out_sharding(out_sh, (
          *explicit.padded_spec(out_sh, base_out.ndim)[:n_free], None))
    # x . a: contract x's lc with a's input axes; a's free axis is the rank.
    dims_a = jc.RaggedDims(
        ((lc, tuple(ha.index(j) for j in rc)), ((), ())), rd.lhs_ragged,
        tuple(ha.index(j) for j in rd.rhs_group))
    h = use.bind([x.astype(dtype), a.astype(dtype), groups],
                 jc.with_out_sharding(
                     jc.with_ragged_dims(use.params, dims_a), h_sh))
    # h has x's free axes then the rank axis; contract the rank with b's.
    n_free = h.ndim - 1
    ragged_h = tuple(sorted(
        k - sum(c < k for c in lc) for k in rd.lhs_ragged))
    dims_b = jc.RaggedDims(
        (((n_free,), (b.ndim - 1,)), ((), ())), ragged_h,
        tuple(hb.index(j) for j in rd.rhs_group))
    h = (v.meta * h).astype(dtype)
    d = use.bind([h, b.astype(dtype), groups], jc.with_out_sharding(
        jc.with_ragged_dims(use.params, dims_b), out_sh))
    out_dtype = use.out_aval.dtype
    return (base_out + d.astype(out_dtype)).astype(out_dtype)

  def concatenate(self, use: Use) -> Factored | None:
    """Fused weights (QKV, gate/up): concatenated low-rank pieces.

    Along an output axis the `a` factors are concatenated along the rank
    axis and the `b` factors placed block-diagonally (rank block `k` feeds
    only output block `k`); along an input axis the other way round; along
    a stacked axis both are concatenated when the ranks agree. Each piece's
    scale is folded into its `b`, so pieces of different ranks and scales
    mix. Plain (not adapted) pieces are rank-0 pieces.
    """
    dim = jc.concat_dim(use.params)
    pieces = use.operands
    tagged = [p for p in pieces if isinstance(p, Factored)]
    roles = tagged[0].roles
    if any(p.kind is not self or p.roles != roles for p in tagged):
      return None
    if any(not isinstance(p.base, jax.Array) for p in tagged):
      return None  # A lazy base would be dequantized whole: no gain.
    role = roles[dim]
    base = jnp.concatenate([dense(p.base) if isinstance(p, Factored) else p
                            for p in pieces], dim)
    held_a = [j for j, c in enumerate(roles) if c in "si"]
    held_b = [j for j, c in enumerate(roles) if c in "so"]
    dtype = tagged[0].parts[1].dtype

    def factors(p):
      if isinstance(p, Factored):
        a, b = p.parts
        return a, (p.meta * b.astype(jnp.float32)).astype(b.dtype)
      shape = p.shape
      a = jnp.zeros([shape[j] for j in held_a] + [0], dtype)
      b = jnp.zeros([shape[j] for j in held_b] + [0], dtype)
      return a, b

    fs = [factors(p) for p in pieces]
    ranks = [a.shape[-1] for a, _ in fs]
    if role == "s":
      if len(set(ranks)) != 1:
        return None
      a = jnp.concatenate([f[0] for f in fs], held_a.index(dim))
      b = jnp.concatenate([f[1] for f in fs], held_b.index(dim))
    else:
      full, blocks = (0, 1) if role == "o" else (1, 0)
      held_blk = held_b if role == "o" else held_a
      ax = held_blk.index(dim)
      total = sum(ranks)
      cat = jnp.concatenate([f[full] for f in fs], -1)
      rows, start = [], 0
      for f, rk in zip(fs, ranks):
        blk = f[blocks]
        pad = [(0, 0)] * (blk.ndim - 1) + [(start, total - start - rk)]
        rows.append(jnp.pad(blk, pad))
        start += rk
      diag = jnp.concatenate(rows, ax)
      a, b = (cat, diag) if role == "o" else (diag, cat)
    # On an Explicit mesh the new factors are laid out like the fused base.
    return self.refit(Factored(base, (a, b), roles, MASKS, self, 1.0, "+".join(
        dict.fromkeys(p.path for p in tagged))))


def lookup(v: Factored, use: Use) -> jax.Array | None:
  """A gather that looks up input or output axes of `v`, as a dense result.

  The gather is recognised by its dimension numbers (`layouts.gather_op`):
  any indexed axes of one role, `i` (an embedding table `(vocab, d)`
  indexed by token ids, also under `vmap`) or `o` (a transposed table
  indexed along its second axis), full slices elsewhere, `vmap` batching
  over stacked axes, any mode. It is applied to the base and to the factors
  that hold the indexed axes (`a` for `i`), the others are moved along, and
  the kind's own `materialize` turns the gathered value into the dense
  result, e.g. `W[ids] + scale * a[ids] @ b`: nothing larger than the
  result is formed. Stacked-axis indexing (`w[expert_ids]`) is not a lookup
  (the result is still a weight): None, so the interpreter keeps it
  factored as a structural op.

  In `fill` mode the factors are gathered with a fill value of 0 (finite,
  so no NaN reaches the gradient) and the windows out of bounds take the
  base's result, which is the fill value the merged path gives.

  Args:
    v: The gathered weight (the gather's operand).
    use: The gather.

  Returns:
    The result, or None when the gather is not a lookup of this kind.
  """
  if use.position != 0 or any(isinstance(x, Factored)
                              for x in use.operands[1:]):
    return None
  out_shape = tuple(use.out_aval.shape)
  plan = layouts.gather_plan(use.params, v.shape, out_shape)
  if plan is None:
    return None
  r_k = {v.roles[k] for k in plan.indexed}
  if len(r_k) != 1 or r_k == {"s"}:
    return None
  (role,) = r_k
  if any(v.roles[j] not in ("s", role) for j in plan.batching):
    return None  # e.g. `take_along_axis`: one row index per column.
  for m in v.masks:
    if role in m and any(v.roles[j] not in m for j in plan.batching):
      return None
  op = layouts.gather_op(use.primitive, use.params, v.shape, out_shape,
                         use.operands[1:], part_fill=0)
  assert op is not None  # `plan` is not None.
  roles = op.out_roles(v.roles)
  if roles is None:
    return None
  base_out = use.base_output()
  parts = tuple(op.apply_to(p, v.held(k), held_axes(roles, m))
                for k, (p, m) in enumerate(zip(v.parts, v.masks)))
  out = v.kind.materialize(v.replace(base=base_out, parts=parts,
                                     roles=roles))
  if plan.mode == "fill":
    ok = layouts.gather_in_bounds(use.params, v.shape, use.operands[1])
    ok = lax.broadcast_in_dim(ok, out_shape, plan.batch_pos)
    out = jnp.where(ok, out, base_out)
  return out


def low_rank_contract(
    x_spec: str, x: Float[Array, "*x"], a_spec: str, a: Float[Array, "..."],
    b_spec: str, b: Float[Array, "..."], out: str, *, scale: float,
    precision: Any, preferred_element_type: Any,
    out_sharding: Any = None) -> Float[Array, "..."]:
  """`scale * einsum(x, a, b -> out)` as two explicit contractions, x first.

  `x` is contracted with one factor first, then the result with the other:
  `a @ b` (the dense delta) is never formed. Of the two orders, the one with
  the smaller intermediate is used: `(x @ a) @ b` for an ordinary matmul,
  `(x @ b^T) @ a^T` when the weight's output axes are the contracted ones (a
  tied output head `x @ E.T`). `scale` multiplies the small intermediate.
  `out_sharding` (on Explicit meshes: the sharding of the base weight's
  result) fixes the result's sharding and, on the axes it shares with the
  intermediate, the intermediate's; its rank axis is replicated.
  """
  # XLA:CPU runs the backward of a rank-sized contraction over several token
  # axes (`btd,btr->dr`) several times slower than over one, so runs of
  # `x`'s free axes (its token axes) are merged into one axis first.
  free = [c for c in x_spec if c not in a_spec and c not in b_spec]
  run = "".join(free)
  # (Not on Explicit meshes, where the reshape would need annotations.)
  if (len(free) > 1 and run in x_spec and run in out
      and out_sharding is None):
    z = next(c for c in string.ascii_letters
             if c not in x_spec + a_spec + b_spec + out)
    i = x_spec.index(run)
    merged_shape = (*x.shape[:i], math.prod(x.shape[i:i + len(run)]),
                    *x.shape[i + len(run):])
    y = low_rank_contract(
        x_spec.replace(run, z), jnp.reshape(x, merged_shape), a_spec, a,
        b_spec, b, out.replace(run, z), scale=scale, precision=precision,
        preferred_element_type=preferred_element_type)
    j = out.index(run)
    return jnp.reshape(
        y, y.shape[:j] + x.shape[i:i + len(run)] + y.shape[j + 1:])
  sizes: dict[str, int] = {}
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
  h_sharding = None
  if out_sharding is not None:
    o_entries = explicit.padded_spec(out_sharding, len(out))
    h_sharding = explicit.out_sharding(out_sharding, tuple(
        o_entries[out.index(c)] if c in out else None for c in h_spec))
  h = jnp.einsum(f"{x_spec},{f_spec}->{h_spec}", x, f, precision=precision,
                 preferred_element_type=preferred_element_type,
                 out_sharding=h_sharding)
  h = (scale * h).astype(s.dtype)
  return jnp.einsum(f"{h_spec},{s_spec}->{out}", h, s,
                    precision=precision,
                    preferred_element_type=preferred_element_type,
                    out_sharding=out_sharding)


LORA = LoraKind()
register_adapter_kind(LoraWeight, LORA)
