"""lorajax.lora's rule table: custom derivatives, ragged_dot, fused weights,
fallbacks that stay correct, the JAX it relies on, and its extension points.
"""

import dataclasses
import os
import warnings

import _testing
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax._src.core import extend, factored, jax_compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL, ATOL = 2e-4, 2e-5


def _setup(params, config, key=0):
  adapter = lorajax.init(params, config, key=jax.random.key(key))
  return _testing.perturb(adapter, jax.random.key(key + 1))


def _check(fn, params, adapter, *args, strict=True, want_fallback=None):
  """lora(fn) equals fn(merge(...)) in value and adapter gradient, jitted."""
  return _testing.check_matches_merged(
      fn, params, adapter, *args, strict=strict, want_fallback=want_fallback,
      rtol=RTOL, atol=ATOL)


# -- the JAX the rule table relies on ---------------------------------------


def test_installed_jax_has_every_primitive_and_param():
  problems = jax_compat.check_installed_jax()
  assert not problems, (
      f"JAX {jax.__version__} changed what lorajax.lora relies on; update"
      " lorajax/_src/core/jax_compat.py:\n" + "\n".join(problems))


def test_every_rule_is_keyed_on_a_resolved_primitive():
  table = factored._rules()  # pylint: disable=protected-access
  names = {r.name for r in factored._RULES  # pylint: disable=protected-access
           if r.name not in jax_compat._OPTIONAL}  # pylint: disable=protected-access
  missing = names - {r.name for r in table.values()}
  assert not missing, f"rules without a primitive in JAX {jax.__version__}:" \
      f" {sorted(missing)}"
  for prim, rule in table.items():
    assert prim.name == rule.name or rule.name in ("jit", "remat"), (
        prim.name, rule.name)


def test_docs_rule_table_is_generated():
  path = os.path.join(ROOT, "docs", "factored_rules.md")
  with open(path) as f:
    text = f.read()
  assert text == factored.rules_markdown(), (
      "docs/factored_rules.md is out of date: regenerate it with\n  python -c"
      " \"from lorajax._src.core import factored; print(factored."
      "rules_markdown(), end='')\" > docs/factored_rules.md")


# -- custom derivative rules are honoured -------------------------------------


@jax.custom_vjp
def _ste_round(w):
  return jnp.round(w)


_ste_round.defvjp(lambda w: (jnp.round(w), None), lambda _, g: (g,))


@jax.custom_jvp
def _ste_round_jvp(w):
  return jnp.round(w)


_ste_round_jvp.defjvp(lambda p, t: (jnp.round(p[0]), t[0]))


@pytest.mark.parametrize("ste", [_ste_round, _ste_round_jvp],
                         ids=["custom_vjp", "custom_jvp"])
def test_straight_through_estimator_gradient(ste):
  params = {"w": 3.0 * jax.random.normal(jax.random.key(0), (6, 5))}
  adapter = _setup(params, lorajax.LoraConfig(rank=2, targets="w"))
  x = jax.random.normal(jax.random.key(2), (4, 6))
  fn = lambda p, x: jnp.tanh(x @ ste(p["w"]))  # noqa: E731
  # Identity backward: d/dA of sum(sin(x @ round(W + s A B))) is the dense
  # gradient of `x @ V` at V = round(W + s A B), chained through `s A B`.
  msgs = _check(fn, params, adapter, x, strict=False,
                want_fallback="_ste_round")
  assert "custom derivative rule is honoured" in msgs[0]
  merged = lorajax.merge(params, adapter)
  v = jnp.round(merged["w"])
  z = np.asarray(x @ v)
  gy = np.cos(np.tanh(z)) * (1 - np.tanh(z) ** 2)
  g_w = np.asarray(x).T @ gy  # dL/dV, passed straight through.
  node = adapter["w"]
  g_a = node.scale * g_w @ np.asarray(node.b).T
  got = jax.grad(lambda ad: jnp.sum(jnp.sin(
      lorajax.lora(fn)(params, ad, x))))(adapter)
  np.testing.assert_allclose(got["w"].a, g_a, rtol=1e-3, atol=1e-4)
  assert np.abs(g_a).max() > 1e-2
  with pytest.raises(lorajax.LoraFallbackError,
                     match=r"'w' is used by `custom_.*_call of _ste_round"):
    lorajax.lora(fn, strict=True)(params, adapter, x)


# -- MoE: ragged_dot -----------------------------------------------------------


def _ragged_moe(params, x, group_sizes):
  h = jax.nn.gelu(jax.lax.ragged_dot(x, params["w_in"], group_sizes))
  return jax.lax.ragged_dot(h, params["w_out"], group_sizes)


def test_ragged_dot_moe_per_expert_adapters():
  k = jax.random.split(jax.random.key(5), 4)
  e, d, f = 3, 6, 8
  params = {"w_in": jax.random.normal(k[0], (e, d, f)) / 3,
            "w_out": jax.random.normal(k[1], (e, f, d)) / 3}
  x = jax.random.normal(k[2], (10, d))
  groups = jnp.array([4, 0, 6], jnp.int32)
  config = lorajax.LoraConfig(rank=2, targets="w_.*")
  axes = lorajax.infer_axes(_ragged_moe, params, x, groups, config=config)
  assert axes == {"w_in": "sio", "w_out": "sio"}
  adapter = _setup(params, dataclasses.replace(config, axes=axes))
  _check(_ragged_moe, params, adapter, x, groups)
  # Dense per-expert reference: token t goes through its expert's own
  # W + s * a_e @ b_e.
  out = lorajax.lora(_ragged_moe, strict=True)(params, adapter, x, groups)
  expert = np.repeat(np.arange(e), np.asarray(groups))
  xn = np.asarray(x, np.float64)
  ref = np.zeros((x.shape[0], d))
  for g in range(e):
    rows = expert == g
    w = {n: np.asarray(params[n][g], np.float64) + adapter[n].scale
         * np.asarray(adapter[n].a[g]) @ np.asarray(adapter[n].b[g])
         for n in params}
    z = xn[rows] @ w["w_in"]  # jax.nn.gelu's tanh approximation:
    h = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    ref[rows] = h @ w["w_out"]
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  # The per-expert products stay rank-sized: no (e, d, f) merged weight.
  loss = lambda ad: jnp.sum(lorajax.lora(_ragged_moe)(  # noqa: E731
      params, ad, x, groups) ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss))(adapter)
  shapes = {(e, d, f), (e, f, d)}
  assert not [q for q in _all_eqns(jaxpr.jaxpr) if q.primitive.name in (
      "dot_general", "ragged_dot_general") and tuple(
          q.outvars[0].aval.shape) in shapes]


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax_compat.jaxprs_in_params(eqn.params):
      yield from _all_eqns(sub)


# -- fused weights ----------------------------------------------------------


def _fused_qkv(params, x):
  p = params["attn"]
  w = jnp.concatenate([p["q"], p["k"], p["v"]], axis=1)  # (d, 3d)
  q, k, v = jnp.split(x @ w, 3, axis=-1)
  att = jax.nn.softmax(q @ k.T / 2.0)
  gate_up = jnp.concatenate([params["gate"], params["up"]], axis=1)
  g, u = jnp.split((att @ v) @ gate_up, 2, axis=-1)
  down = jnp.concatenate([params["down_a"], params["down_b"]], axis=0)
  return jnp.concatenate([jax.nn.silu(g), u], -1) @ down


def test_fused_qkv_gate_up_and_input_axis_concatenation():
  k = jax.random.split(jax.random.key(7), 8)
  d = 6
  dense = lambda key, i, o: jax.random.normal(key, (i, o)) / 2  # noqa: E731
  params = {"attn": {n: dense(k[j], d, d) for j, n in enumerate("qkv")},
            "gate": dense(k[3], d, 5), "up": dense(k[4], d, 5),
            "down_a": dense(k[5], 5, d), "down_b": dense(k[6], 5, d)}
  x = jax.random.normal(k[7], (4, d))
  # q and v adapted, k not; different ranks.
  config = lorajax.LoraConfig(rank=2, targets="attn/(q|v)|gate|up|down_.",
                              rank_pattern={"attn/v": 3, "down_b": 1})
  adapter = _setup(params, config)
  _check(_fused_qkv, params, adapter, x)  # strict=True: no fallback.


# -- fallbacks that must stay correct ------------------------------------------


def test_weight_in_scan_carry_falls_back_and_is_reported():
  params = {"w": jax.random.normal(jax.random.key(0), (5, 5)) / 2}
  adapter = _setup(params, lorajax.LoraConfig(rank=2, targets="w"))
  x = jax.random.normal(jax.random.key(1), (3, 5))

  def fn(p, x):
    def body(c, _):
      w, h = c
      return (w * 0.9, jnp.tanh(h @ w)), None
    return jax.lax.scan(body, (p["w"], x), None, length=3)[0][1]

  _check(fn, params, adapter, x, strict=False, want_fallback="`scan carry`")


def test_weight_in_while_carry_falls_back_and_is_reported():
  params = {"w": jax.random.normal(jax.random.key(0), (5, 5)) / 2}
  adapter = _setup(params, lorajax.LoraConfig(rank=2, targets="w"))
  x = jax.random.normal(jax.random.key(1), (3, 5))

  def fn(p, x):
    return jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (
        c[0] + 1, c[1] * 0.5, jnp.tanh(c[2] @ c[1])), (0, p["w"], x))[2]

  with pytest.warns(lorajax.LoraFallbackWarning, match="`while carry`"):
    got = lorajax.lora(fn)(params, adapter, x)
  np.testing.assert_allclose(got, fn(lorajax.merge(params, adapter), x),
                             rtol=RTOL, atol=ATOL)
  tangent = jax.jvp(lambda ad: lorajax.lora(fn)(params, ad, x), (adapter,),
                    (adapter,))[1]
  ref = jax.jvp(lambda ad: fn(lorajax.merge(params, ad), x), (adapter,),
                (adapter,))[1]
  np.testing.assert_allclose(tangent, ref, rtol=1e-3, atol=1e-4)


def test_dot_of_two_adapted_weights_falls_back_and_is_reported():
  k = jax.random.split(jax.random.key(3), 3)
  params = {"w": jax.random.normal(k[0], (5, 4)) / 2,
            "v": jax.random.normal(k[1], (4, 6)) / 2}
  adapter = _setup(params, lorajax.LoraConfig(rank=2, targets="w|v"))
  x = jax.random.normal(k[2], (3, 5))
  fn = lambda p, x: x @ (p["w"] @ p["v"])  # noqa: E731
  msgs = _check(fn, params, adapter, x, strict=False,
                want_fallback="`dot_general`")
  assert any("'w'" in m for m in msgs) and any("'v'" in m for m in msgs)


# -- extension points -------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Int8Rows(extend.LazyBase):
  """A toy quantized weight: int8 codes, one float scale per last-axis row."""

  codes: jax.Array  # (..., d_in, d_out) int8
  scales: jax.Array  # (..., 1, d_out) float32

  @property
  def shape(self):
    return tuple(self.codes.shape)

  @property
  def dtype(self):
    return self.scales.dtype

  def dequantize(self):
    return self.codes.astype(self.scales.dtype) * self.scales

  def structural(self, op):
    if op.name not in {"dynamic_slice", "squeeze"}:
      return None
    # Both stored arrays hold every weight axis; size-1 axes of `scales`
    # must not be sliced past their size, so only stacked-axis ops here.
    every = list(range(len(self.shape)))
    out = list(range(len(op.out_shape)))
    return _Int8Rows(op.apply_to(self.codes, every, out),
                     op.apply_to(self.scales, every, out))

  def scan_split(self):
    return (self.codes, self.scales), lambda s: _Int8Rows(*s)


def _quantize(w):
  scales = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / 127.0
  return _Int8Rows(jnp.round(w / scales).astype(jnp.int8), scales)


def test_lazy_base_runs_through_scan_and_matmul():
  w = jax.random.normal(jax.random.key(0), (3, 6, 6)) / 2
  q = _quantize(w)
  params = {"layers": {"w": q}, "head": jax.random.normal(
      jax.random.key(1), (6, 4))}
  dense_params = {"layers": {"w": q.dequantize()}, "head": params["head"]}
  x = jax.random.normal(jax.random.key(2), (2, 6))

  def fn(p, x):
    h = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x,
                     p["layers"]["w"])[0]
    return h @ p["head"]

  config = lorajax.LoraConfig(rank=2, targets="layers/w|head",
                              axes={"layers/w": "sio"})
  adapter = _setup(dense_params, config)
  got = jax.jit(lorajax.lora(fn, strict=True))(params, adapter, x)
  want = fn(lorajax.merge(dense_params, adapter), x)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  g = jax.grad(lambda ad: jnp.sum(lorajax.lora(fn)(params, ad, x) ** 2))(
      adapter)
  g_ref = jax.grad(lambda ad: jnp.sum(
      fn(lorajax.merge(dense_params, ad), x) ** 2))(adapter)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    peak = float(np.abs(np.asarray(b)).max())
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * max(1.0, peak))
  # Not adapted at all: still traced by its dense shape and dequantized.
  no_adapter = jax.tree.map(lambda _: None, adapter,
                            is_leaf=lambda x: x is None or isinstance(
                                x, lorajax.LoraWeight))
  np.testing.assert_allclose(
      lorajax.lora(fn)(params, no_adapter, x), fn(dense_params, x),
      rtol=RTOL, atol=ATOL)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _OutScale:
  """A toy adapter kind: `W * (1 + lam)` with one trainable `lam` per output."""

  lam: jax.Array  # (d_out,)


class _OutScaleKind(extend.AdapterKind):
  """Weights stored `(d_out, d_in)` ("oi"), used as `x @ w.T`."""

  name = "out_scale"

  def factored(self, node, base, path):
    return extend.Factored(base, (node.lam,), "oi", ("o",), self, None, path)

  def check(self, node, shape, path):
    ok = len(shape) == 2 and node.lam.shape == shape[:1]
    return [] if ok else [f"{path!r}: `lam` must have shape {shape[:1]}"]

  def materialize(self, v):
    w = extend.dense(v.base)
    (lam,) = v.parts
    shape = [1] * v.ndim
    (o,) = v.held(0)
    shape[o] = lam.shape[0]
    return w * (1 + lam.reshape(shape))

  def dot_general(self, v, use):
    (lc, rc), _ = jax_compat.dot_dims(use.params)
    (o,) = v.held(0)
    if use.position != 1 or o in rc or v.ndim != 2:
      return None  # Leave other layouts to the fallback.
    y = use.base_output()  # The weight's one free axis comes last.
    return y * (1 + v.parts[0])


def test_registered_adapter_kind_runs_through_structural_ops():
  extend.register_adapter_kind(_OutScale, _OutScaleKind())
  w = jax.random.normal(jax.random.key(0), (5, 4))  # (d_out, d_in)
  params = {"w": w}
  lam = 0.5 * jax.random.normal(jax.random.key(1), (5,))
  x = jax.random.normal(jax.random.key(2), (3, 4))
  fn = lambda p, x: x @ p["w"].T  # noqa: E731  (a transpose, then a dot)
  adapter = {"w": _OutScale(lam)}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = jax.jit(lorajax.lora(fn, strict=True))(params, adapter, x)
  np.testing.assert_allclose(got, (x @ w.T) * (1 + lam), rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda ad: jnp.sum(lorajax.lora(fn)(params, ad, x) ** 2))(
      adapter)
  g_ref = jax.grad(lambda lam: jnp.sum(((x @ w.T) * (1 + lam)) ** 2))(lam)
  np.testing.assert_allclose(g["w"].lam, g_ref, rtol=1e-4, atol=1e-5)
  # An elementwise use takes the kind's materialised weight (reported).
  with pytest.warns(lorajax.LoraFallbackWarning, match="`mul`"):
    got = lorajax.lora(lambda p: p["w"] * 2.0)(params, adapter)
  np.testing.assert_allclose(got, 2.0 * w * (1 + lam)[:, None], rtol=1e-5)
  with pytest.raises(ValueError, match=r"'w': `lam` must have shape \(4,\)"):
    lorajax.lora(fn)({"w": w.T}, adapter, x)
