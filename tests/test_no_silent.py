"""No silent wrong numbers from `lorajax.lora` (issue 18).

Each case compares `lorajax.lora(fn)` with `fn(lorajax.merge(params,
adapter))` in value and adapter gradient, on perturbed (non-zero `b`)
adapters: lossy casts and `reduce_precision` fall back (reported; raised
under `strict=True`), value-preserving and rounding casts stay factored
(within the target type's rounding), custom derivative rules are honoured,
and gathers are recognised by their dimension numbers.
"""

import dataclasses

import _testing
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lorajax
from lorajax._src.core import jax_compat

K = jax.random.split(jax.random.key(18), 8)
X = jax.random.normal(K[0], (3, 6))


def _adapter(params, targets, key=0, **kw):
  config = lorajax.LoraConfig(rank=2, alpha=4.0, targets=targets, **kw)
  adapter = lorajax.init(params, config, key=jax.random.key(key))
  return _testing.perturb(adapter, jax.random.key(key + 1))


def _w(key, shape, scale=1.0, dtype=jnp.float32):
  return (scale * jax.random.normal(key, shape)).astype(dtype)


# -- lossy casts ------------------------------------------------------------

LOSSY = {  # weight name -> what the model does to it before the matmul
    "i8": lambda w: w.astype(jnp.int8).astype(jnp.float32),
    "u8": lambda w: w.astype(jnp.uint8).astype(jnp.float32),
    "e4m3": lambda w: w.astype(jnp.float8_e4m3fn).astype(jnp.float32),
    "e5m2": lambda w: w.astype(jnp.float8_e5m2).astype(jnp.float32),
    "bool": lambda w: w.astype(bool).astype(jnp.float32),
    "rp43": lambda w: lax.reduce_precision(w, exponent_bits=4,
                                           mantissa_bits=3),
    "rp87": lambda w: lax.reduce_precision(w, exponent_bits=8,
                                           mantissa_bits=7),
}


def _lossy_program(p, x):
  return jnp.concatenate([x @ cast(p[n]) for n, cast in LOSSY.items()], -1)


def test_lossy_casts_fall_back_to_the_merged_weight():
  params = {n: _w(K[j % 8], (6, 5), 2.0) for j, n in enumerate(LOSSY)}
  adapter = _adapter(params, "|".join(LOSSY))
  # Before the fix the factored result was off by 4-70% here, unreported.
  # Casts to integers and booleans have a zero derivative: the merged
  # gradient of those weights is zero, and so must ours be.
  msgs = _testing.check_matches_merged(
      _lossy_program, params, adapter, X, strict=False,
      want_fallback="is not value-preserving", rtol=1e-5, atol=1e-5,
      grad_atol=1e-6, nonzero_grads=False)
  for name in LOSSY:
    op = "reduce_precision" if name.startswith("rp") else (
        "convert_element_type")
    assert any(f"'{name}' is used by `{op}`" in m for m in msgs), name


@pytest.mark.parametrize("name", list(LOSSY))
def test_lossy_cast_raises_under_strict(name):
  params = {"w": _w(K[1], (6, 5))}
  adapter = _adapter(params, "w")
  fn = lambda p, x: x @ LOSSY[name](p["w"])  # noqa: E731
  with pytest.raises(lorajax.LoraFallbackError,
                     match=r"'w' is used by `(convert_element_type|"
                     r"reduce_precision)` \((a cast from float32 to |"
                     r"reduce_precision to )"):
    lorajax.lora(fn, strict=True)(params, adapter, X)


def test_value_preserving_casts_stay_factored_and_exact():
  params = {"bf": _w(K[2], (6, 5), dtype=jnp.bfloat16),
            "f16": _w(K[3], (6, 5), dtype=jnp.float16),
            "rp": _w(K[4], (6, 5))}
  # Widening loses nothing: the result is `x @ (W + s a b)` computed in
  # float32 (the reference merges into float32 copies, since `merge` itself
  # would round `W + s a b` to the storage dtype).
  f32 = jax.tree.map(lambda w: w.astype(jnp.float32), params)

  def fn(p, x):
    return jnp.concatenate([
        x @ p["bf"].astype(jnp.float32),  # widening: exact
        x @ p["f16"].astype(jnp.float32),
        # As many bits as float32 has: a no-op.
        x @ lax.reduce_precision(p["rp"], exponent_bits=8,
                                 mantissa_bits=23)], -1)

  adapter = _adapter(params, "bf|f16|rp")
  _testing.check_matches_merged(fn, params, adapter, X, dense_params=f32,
                                rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16],
                         ids=["bf16", "f16"])
def test_rounding_cast_stays_factored_within_rounding(dtype):
  # f32 -> bf16/f16 is how mixed-precision models run: it stays factored.
  # The factored path rounds W and adds the low-rank term unrounded; the
  # merged path rounds W + s a b. Both are within one rounding of the exact
  # value, so they differ by at most eps * (|W| + |W'|) per weight entry.
  w = _w(K[5], (6, 5))
  params = {"w": w}
  adapter = _adapter(params, "w")
  fn = lambda p, x: x @ p["w"].astype(dtype).astype(jnp.float32)  # noqa
  loss = lambda out: jnp.sum(jnp.sin(out))  # noqa: E731
  with _testing.no_fallback():
    out_f, g_f = jax.jit(jax.value_and_grad(
        lambda ad: loss(lorajax.lora(fn, strict=True)(params, ad, X))))(
            adapter)
  out_m, g_m = jax.jit(jax.value_and_grad(
      lambda ad: loss(fn(lorajax.merge(params, ad), X))))(adapter)
  eps = float(jnp.finfo(dtype).eps)
  merged_w = np.asarray(lorajax.merge(params, adapter)["w"])
  y_f = np.asarray(jax.jit(lorajax.lora(fn))(params, adapter, X))
  y_m = np.asarray(jax.jit(lambda ad: fn(lorajax.merge(params, ad), X))(
      adapter))
  bound = eps * np.abs(np.asarray(X)) @ (np.abs(np.asarray(w))
                                         + np.abs(merged_w))
  assert np.all(np.abs(y_f - y_m) <= bound + 1e-6)
  assert abs(float(out_f) - float(out_m)) <= np.sum(bound) + 1e-5
  # The gradient differs by the rounding of dL/dW' in the merged path.
  for x, y in zip(jax.tree.leaves(g_m), jax.tree.leaves(g_f)):
    peak = float(np.abs(np.asarray(x)).max())
    assert peak > 0
    np.testing.assert_allclose(y, x, rtol=0, atol=8 * eps * peak)


def test_lossy_cast_on_quantized_dora_and_vera_weights():
  w = _w(K[6], (64, 8), 0.5)
  q = lorajax.quantize({"kernel": w}, "nf4", min_size=0)
  dense = lorajax.quant.dequantize(q)
  x = 0.2 * jax.random.normal(K[7], (3, 64))
  fp8 = lambda p, x: x @ p["kernel"].astype(  # noqa: E731
      jnp.float8_e4m3fn).astype(jnp.float32)
  # Quantized base: the fallback dequantizes and merges, exactly.
  adapter = _adapter(dense, "kernel")
  _testing.check_matches_merged(fp8, q, adapter, x, strict=False,
                                dense_params=dense, want_fallback="float8")
  with pytest.raises(lorajax.LoraFallbackError, match="float8_e4m3fn"):
    lorajax.lora(fp8, strict=True)(q, adapter, x)
  # A rounding cast of a quantized weight stays factored.
  bf16 = lambda p, x: x @ p["kernel"].astype(  # noqa: E731
      jnp.bfloat16).astype(jnp.float32)
  _testing.check_matches_merged(bf16, q, adapter, x, dense_params=dense,
                                rtol=1e-2, atol=1e-2, grad_rtol=1e-2,
                                grad_atol=1e-2)
  # DoRA: the merged weight includes the magnitude rescaling.
  dora = _adapter(dense, "kernel", use_dora=True)
  _testing.check_matches_merged(fp8, dense, dora, x, strict=False,
                                want_fallback="float8")
  # VeRA: the frozen projections get no gradient on either path.
  vera = lorajax.init(dense, lorajax.VeraConfig(rank=4, targets="kernel"),
                      key=jax.random.key(3))
  node = vera["kernel"]
  vera = {"kernel": dataclasses.replace(
      node, lambda_b=0.5 * jax.random.normal(K[1], node.lambda_b.shape))}

  def frozen(ad):
    n = ad["kernel"]
    return {"kernel": dataclasses.replace(
        n, a=lax.stop_gradient(n.a), b=lax.stop_gradient(n.b))}

  _testing.check_matches_merged(
      fp8, dense, vera, x, strict=False,
      want_fallback="float8", nonzero_grads=False,
      merge=lambda p, ad: lorajax.merge(p, frozen(ad)))


# -- custom derivative rules ---------------------------------------------------


@jax.custom_vjp
def _scale_grad(w):
  return w


_scale_grad.defvjp(lambda w: (w, None), lambda _, g: (0.1 * g,))


@jax.custom_vjp
def _clip_grad(w):
  return w


_clip_grad.defvjp(lambda w: (w, None),
                  lambda _, g: (jnp.clip(g, -0.05, 0.05),))


@jax.custom_vjp
def _straight_through(w):
  return jnp.round(4 * w) / 4


_straight_through.defvjp(lambda w: (jnp.round(4 * w) / 4, None),
                         lambda _, g: (g,))


@jax.custom_vjp
def _while_forward(w):
  return lax.while_loop(lambda c: c[0] < 3,
                        lambda c: (c[0] + 1, 0.9 * c[1]), (0, w))[1]


_while_forward.defvjp(lambda w: (_while_forward(w), None),
                      lambda _, g: (0.729 * g,))


@jax.custom_jvp
def _half_tangent(w):
  return jnp.sin(w)


_half_tangent.defjvp(lambda p, t: (jnp.sin(p[0]), 0.5 * t[0]))

CUSTOM = {"scale_grad": _scale_grad, "clip_grad": _clip_grad,
          "straight_through": _straight_through,
          "while_forward": _while_forward, "half_tangent": _half_tangent}


@pytest.mark.parametrize("name", list(CUSTOM))
def test_custom_derivative_rules_are_honoured(name):
  params = {"w": _w(K[2], (6, 5))}
  adapter = _adapter(params, "w")
  rule = CUSTOM[name]
  fn = lambda p, x: jnp.tanh(x @ rule(p["w"]))  # noqa: E731
  msgs = _testing.check_matches_merged(
      fn, params, adapter, X, strict=False, want_fallback=f"_{name}",
      rtol=1e-5, atol=1e-6, grad_atol=1e-6)
  assert "custom derivative rule is honoured" in msgs[0]
  with pytest.raises(lorajax.LoraFallbackError,
                     match=rf"'w' is used by `custom_.*_call of _{name}"):
    lorajax.lora(fn, strict=True)(params, adapter, X)


def test_gradient_scaling_matches_an_independent_reference():
  params = {"w": _w(K[3], (6, 5))}
  adapter = _adapter(params, "w")
  loss = lambda f: lambda ad: jnp.sum(  # noqa: E731
      jnp.sin(lorajax.lora(f)(params, ad, X)))
  plain = lambda p, x: x @ p["w"]  # noqa: E731
  scaled = lambda p, x: x @ _scale_grad(p["w"])  # noqa: E731
  with pytest.warns(lorajax.LoraFallbackWarning, match="_scale_grad"):
    g = jax.jit(jax.grad(loss(scaled)))(adapter)
  g_plain = jax.jit(jax.grad(loss(plain)))(adapter)
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(x, 0.1 * y, rtol=1e-5, atol=1e-7)


# `strict=True` must never pass a program whose gradient differs from the
# merged path: each of these either raises or matches.
STRICT_SWEEP = {
    **{f"cast_{n}": c for n, c in LOSSY.items()},
    **{f"custom_{n}": r for n, r in CUSTOM.items()},
    "stop_gradient": lax.stop_gradient,
    "round": lambda w: jnp.round(4 * w) / 4,
    "remat": jax.checkpoint(lambda w: w.T.T),
    "cond": lambda w: lax.cond(True, lambda: w, lambda: -w),
    "jit_bf16": jax.jit(lambda w: w.astype(jnp.bfloat16).astype(
        jnp.float32)),
}


@pytest.mark.parametrize("name", list(STRICT_SWEEP))
def test_strict_never_passes_a_different_gradient(name):
  params = {"w": _w(K[4], (6, 5))}
  adapter = _adapter(params, "w")
  op = STRICT_SWEEP[name]
  fn = lambda p, x: jnp.tanh(x @ op(p["w"]))  # noqa: E731
  loss = lambda apply: lambda ad: jnp.sum(jnp.sin(apply(ad)))  # noqa: E731
  try:
    g = jax.jit(jax.grad(loss(lambda ad: lorajax.lora(fn, strict=True)(
        params, ad, X))))(adapter)
  except lorajax.LoraFallbackError:
    return
  g_m = jax.jit(jax.grad(loss(lambda ad: fn(lorajax.merge(params, ad),
                                            X))))(adapter)
  tol = 1e-2 if "bf16" in name else 1e-5  # bf16: rounding, see above.
  for x, y in zip(jax.tree.leaves(g_m), jax.tree.leaves(g)):
    peak = float(np.abs(np.asarray(x)).max())
    np.testing.assert_allclose(y, x, rtol=0, atol=tol * max(peak, 1e-3))


# -- gathers by dimension numbers ------------------------------------------

V, D = 13, 6
IDS = jnp.array([[1, 3, 12], [3, 0, 7]])
OOB = jnp.array([2, 13, 5, 40])  # 13 and 40 out of bounds (no wrap)


def _nan_to_zero(y):
  return jnp.where(jnp.isnan(y), 0.0, y)


def _lookups(p, ids):
  e = p["embed"]  # (V, D), axes "io"
  outs = [
      e[ids],
      jnp.take(e, ids, axis=0, mode="clip"),
      jnp.take(e, OOB, axis=0, mode="clip"),
      _nan_to_zero(jnp.take(e, OOB, axis=0, mode="fill")),  # NaN rows
      e.at[OOB].get(mode="fill", fill_value=2.5),
      e.at[OOB].get(mode="fill", fill_value=0.0),
      e.at[ids].get(mode="promise_in_bounds"),
      e[-ids - 1],  # negative indices
      jax.vmap(lambda i: e[i])(ids[0]),  # equinox `Embedding` under vmap
      jax.vmap(lambda i: lax.dynamic_index_in_dim(e, i, keepdims=False))(
          ids[1]),
      jnp.take(e.T, ids, axis=1),  # penzai-style transposed table
      jnp.take(e, ids[0] % D, axis=1),  # indexes the output axis
      jnp.take(e, ids[0] % D, axis=-1, mode="fill", fill_value=1.0),
      jax.vmap(lambda i: lax.dynamic_slice_in_dim(e, i, 2))(ids[0]),
  ]
  return jnp.concatenate([jnp.reshape(o, -1) for o in outs])


def test_lookups_recognised_by_dimension_numbers_stay_factored():
  params = {"embed": _w(K[5], (V, D))}
  adapter = _adapter(params, "embed")
  # strict=True: none of these lookups may fall back.
  _testing.check_matches_merged(_lookups, params, adapter, IDS, rtol=1e-5,
                                atol=1e-6, grad_atol=1e-6)
  # Out-of-bounds windows of a fill gather get the merged path's fill.
  got = jax.jit(lorajax.lora(lambda p: p["embed"].at[OOB].get(
      mode="fill", fill_value=2.5)))(params, adapter)
  np.testing.assert_array_equal(np.asarray(got)[[1, 3]], 2.5)
  nan = jax.jit(lorajax.lora(lambda p: jnp.take(p["embed"], OOB, 0,
                                                mode="fill")))(
      params, adapter)
  assert np.isnan(np.asarray(nan)[[1, 3]]).all()
  assert not np.isnan(np.asarray(nan)[[0, 2]]).any()
  # No dense (V, D) weight: only rows of `a` (or `b`) meet the rank.
  grad = jax.make_jaxpr(jax.grad(lambda ad: jnp.sum(
      lorajax.lora(_lookups)(params, ad, IDS) ** 2)))(adapter)
  big = [e for e in _testing.all_eqns(grad.jaxpr)
         if e.primitive.name in ("dot_general", "add")
         and tuple(e.outvars[0].aval.shape) in ((V, D), (D, V))]
  assert not big, big


def test_stacked_tables_vmap_batching_and_expert_selection():
  tables = _w(K[6], (2, V, D))  # (layer, vocab, d): "sio"
  experts = _w(K[7], (4, D, 5))  # (expert, d, f): "sio"
  params = {"tables": tables, "experts": experts}
  adapter = _adapter(params, "tables|experts",
                     axes={"tables": "sio", "experts": "sio"})

  def fn(p, ids):
    # vmap over the stacked axis: a gather with operand batching dims.
    rows = jax.vmap(lambda t, i: t[i])(p["tables"], ids)  # (2, 3, D)
    w = p["experts"][jnp.array([3, 0, 3])]  # stacked selection: (3, D, 5)
    return jnp.einsum("lbd,bdf->lbf", rows, w)

  _testing.check_matches_merged(fn, params, adapter, IDS, rtol=1e-5,
                                atol=1e-5, grad_atol=1e-6)
  grad = jax.make_jaxpr(jax.grad(lambda ad: jnp.sum(
      lorajax.lora(fn)(params, ad, IDS) ** 2)))(adapter)
  shapes = {(2, V, D), (4, D, 5), (3, D, 5)}
  assert not [e for e in _testing.all_eqns(grad.jaxpr)
              if e.primitive.name in ("dot_general", "add")
              and tuple(e.outvars[0].aval.shape) in shapes]


def test_gathers_that_are_not_lookups_fall_back_exactly():
  params = {"embed": _w(K[1], (V, D)), "experts": _w(K[2], (4, D, 5))}
  adapter = _adapter(params, "embed|experts", axes={"experts": "sio"})
  cols = jnp.array([[0, 5], [2, 2], [1, 4]])

  def fn(p, x):
    # One column per row (`take_along_axis`): not low-rank structured.
    picked = jnp.take_along_axis(p["embed"][:3], cols, axis=1)
    # Stacked selection with a fill value the factors cannot reproduce.
    w = p["experts"].at[jnp.array([1, 9])].get(mode="fill", fill_value=3.0)
    return jnp.concatenate([jnp.reshape(picked, -1),
                            jnp.reshape(x[:, :D] @ w[0], -1),
                            jnp.reshape(x[:, :D] @ w[1], -1)])

  msgs = _testing.check_matches_merged(
      fn, params, adapter, X, strict=False, want_fallback="`gather`",
      rtol=1e-5, atol=1e-5, grad_atol=1e-6)
  assert any("'embed'" in m for m in msgs)
  assert any("'experts'" in m for m in msgs)


def test_lookups_of_dora_vera_and_quantized_tables():
  table = _w(K[3], (V, 32))
  params = {"embed": table}

  def fn(p, ids):
    e = p["embed"]
    return jnp.concatenate([
        jnp.reshape(jax.vmap(lambda i: e[i])(ids[0]), -1),
        jnp.reshape(jnp.take(e.T, ids, axis=1), -1),
        jnp.reshape(jnp.take(e, ids[1] % 32, axis=1), -1)])

  dora = _adapter(params, "embed", use_dora=True)
  _testing.check_matches_merged(fn, params, dora, IDS, rtol=1e-5,
                                atol=1e-5, grad_atol=1e-6)
  vera = lorajax.init(params, lorajax.VeraConfig(rank=4, targets="embed"),
                      key=jax.random.key(3))
  node = vera["embed"]
  vera = {"embed": dataclasses.replace(
      node, lambda_b=0.5 * jax.random.normal(K[4], node.lambda_b.shape))}
  with _testing.no_fallback():
    got = jax.jit(lorajax.lora(fn, strict=True))(params, vera, IDS)
  want = jax.jit(lambda ad: fn(lorajax.merge(params, ad), IDS))(vera)
  np.testing.assert_allclose(got, want,
                             rtol=1e-5, atol=1e-6)
  # A quantized table (blocks along d): rows of codes, then the factors.
  q = lorajax.quantize(params, "q8_0", min_size=0)
  dense = lorajax.quant.dequantize(q)
  lookup = lambda p, ids: jax.vmap(lambda i: p["embed"][i])(ids)  # noqa
  _testing.check_matches_merged(lookup, q, _adapter(dense, "embed"), IDS,
                                dense_params=dense, rtol=1e-5, atol=1e-5,
                                grad_atol=1e-6)


def test_gather_mode_reader():
  closed = jax.make_jaxpr(lambda e: e.at[OOB].get(
      mode="fill", fill_value=2.5))(jnp.zeros((V, D)))
  (eqn,) = [e for e in _testing.all_eqns(closed.jaxpr)
            if e.primitive.name == "gather"]
  assert jax_compat.gather_mode(eqn.params) == "fill"
  assert jax_compat.gather_fill_value(eqn.params) == 2.5


def test_quantized_table_without_adapter_looks_up_rows_only():
  # `vmap` of `w[i]` on a quantized table: rows of codes and scales are
  # gathered and dequantized (no fallback); a value-changing
  # `reduce_precision` of a quantized weight dequantizes it (reported)
  # instead of being dropped.
  q = lorajax.quantize({"embed": _w(K[3], (V, 32))}, "q8_0", min_size=0)
  dense = lorajax.quant.dequantize(q)
  no_adapter = {"embed": None}
  lookup = lambda p, ids: jax.vmap(lambda i: p["embed"][i])(ids)  # noqa
  with _testing.no_fallback():
    got = jax.jit(lorajax.lora(lookup, strict=True))(q, no_adapter, IDS[0])
  np.testing.assert_allclose(got, dense["embed"][IDS[0]], rtol=1e-6)
  rp = lambda p, x: x @ lax.reduce_precision(  # noqa: E731
      p["embed"].T, exponent_bits=5, mantissa_bits=2)
  x = jax.random.normal(K[4], (2, 32))
  with pytest.warns(lorajax.LoraFallbackWarning, match="reduce_precision"):
    got = jax.jit(lorajax.lora(rp))(q, no_adapter, x)
  np.testing.assert_allclose(got, rp(dense, x), rtol=1e-5, atol=1e-5)
