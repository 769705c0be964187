"""lorajax.lora: factored execution equals the merged path, and is factored."""

import dataclasses
import warnings

import _testing
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lorajax
from lorajax._src.core import jax_compat

RTOL, ATOL = 2e-4, 2e-5  # f32, accumulations in a different order.


def _perturb(adapter, key, scale=0.3):
  leaves, treedef = jax.tree.flatten(adapter)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([scale * jax.random.normal(k, x.shape, x.dtype)
                            for k, x in zip(keys, leaves)])


def _adapted_shapes(adapter):
  return {n.weight_shape for n in _testing.nodes_by_path(adapter).values()}


def _assert_matches_merged(fn, params, adapter, *args):
  """Value and adapter-gradient of lora(fn) equal those of fn(merge(...))."""
  def loss_merged(ad):
    return jnp.sum(jnp.sin(fn(lorajax.merge(params, ad), *args)))

  def loss_factored(ad):
    return jnp.sum(jnp.sin(lorajax.lora(fn, strict=True)(params, ad, *args)))

  out_m = fn(lorajax.merge(params, adapter), *args)
  out_f = jax.jit(lorajax.lora(fn, strict=True))(params, adapter, *args)
  base = fn(params, *args)
  # The adapter must matter, or the equality below proves nothing.
  assert np.abs(np.asarray(out_m) - np.asarray(base)).max() > 1e-2
  np.testing.assert_allclose(out_f, out_m, rtol=RTOL, atol=ATOL)
  g_m = jax.grad(loss_merged)(adapter)
  g_f = jax.jit(jax.grad(loss_factored))(adapter)
  for x, y in zip(jax.tree.leaves(g_m), jax.tree.leaves(g_f)):
    peak = np.abs(np.asarray(x)).max()
    assert peak > 0
    np.testing.assert_allclose(y, x, rtol=1e-3, atol=1e-5 * max(1.0, peak))


def _setup(params, config, key=0):
  adapter = lorajax.init(params, config, key=jax.random.key(key))
  return _perturb(adapter, jax.random.key(key + 1))


# -- models ----------------------------------------------------------------


class _LinenBlock(nn.Module):
  d: int = 16

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    q = nn.Dense(self.d, name="query")(h)
    k = nn.Dense(self.d, name="key")(h)
    v = nn.Dense(self.d, name="value")(h)
    att = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / 4.0)
    x = x + nn.Dense(self.d, name="out")(att @ v)
    h = nn.gelu(nn.Dense(2 * self.d, name="up")(nn.LayerNorm()(x)))
    return x + nn.Dense(self.d, name="down")(h)


def test_linen_transformer_block():
  model = _LinenBlock()
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  params = model.init(jax.random.key(1), x)
  adapter = _setup(params, lorajax.LoraConfig(rank=4, alpha=8.0))
  assert len(_adapted_shapes(adapter)) == 3
  _assert_matches_merged(model.apply, params, adapter, x)


class _NNXModel(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(8, 24, rngs=rngs)
    self.down = nnx.Linear(24, 8, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.relu(self.up(x)))


def test_nnx_model():
  graphdef, state = nnx.split(_NNXModel(nnx.Rngs(0)))
  fn = lambda state, x: nnx.merge(graphdef, state)(x)  # noqa: E731
  adapter = _setup(state, lorajax.LoraConfig(rank=3, targets=".*kernel"))
  _assert_matches_merged(fn, state, adapter,
                         jax.random.normal(jax.random.key(2), (7, 8)))


class _ScanLayer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(12, name="mlp")(jnp.tanh(x)), None


class _ScanModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    layers = nn.scan(_ScanLayer, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=4)
    return layers(name="layers")(x, None)[0]


def test_nn_scan_over_stacked_layers():
  model = _ScanModel()
  x = jax.random.normal(jax.random.key(0), (3, 12))
  params = model.init(jax.random.key(1), x)
  kernel = params["params"]["layers"]["mlp"]["kernel"]
  assert kernel.shape == (4, 12, 12)
  config = lorajax.LoraConfig(rank=2, targets=".*kernel")
  axes = lorajax.sharding.infer_axes(model.apply, params, x, config=config)
  assert list(axes.values()) == ["sio"]
  adapter = _setup(params, dataclasses.replace(config, axes=axes))
  assert adapter["params"]["layers"]["mlp"]["kernel"].a.shape == (4, 12, 2)
  _assert_matches_merged(model.apply, params, adapter, x)


class _MultiAxisAttention(nn.Module):
  heads: int = 3
  head_dim: int = 4

  @nn.compact
  def __call__(self, x):
    proj = lambda n: nn.DenseGeneral((self.heads, self.head_dim),  # noqa
                                     name=n)(x)
    q, k, v = proj("q"), proj("k"), proj("v")
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k))
    o = jnp.einsum("bhqk,bkhd->bqhd", w, v)
    return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="o")(o)


def test_multi_axis_attention_and_inferred_axes():
  model = _MultiAxisAttention()
  x = jax.random.normal(jax.random.key(0), (2, 5, 10))
  params = model.init(jax.random.key(1), x)
  config = lorajax.LoraConfig(rank=3, targets="attention")
  with pytest.raises(ValueError, match=r"(?s)needs an `axes` entry.*"
                     r"`lorajax\.sharding\.infer_axes\(fn, params, \*args,"
                     r" config="):
    lorajax.init(params, config, key=jax.random.key(0))
  axes = lorajax.sharding.infer_axes(model.apply, params, x, config=config)
  assert axes == {"params/q/kernel": "ioo", "params/k/kernel": "ioo",
                  "params/v/kernel": "ioo", "params/o/kernel": "iio"}
  adapter = _setup(params, dataclasses.replace(config, axes=axes))
  assert adapter["params"]["q"]["kernel"].b.shape == (3, 3, 4)
  _assert_matches_merged(model.apply, params, adapter, x)


def _moe(params, x):
  """Top-1 routing over 4 experts with expert-stacked kernels."""
  gate = jax.nn.one_hot(jnp.argmax(x @ params["router"], -1), 4)
  xe = jnp.einsum("td,te->etd", x, gate)  # dispatch tokens to experts
  h = jax.nn.gelu(jnp.einsum("etd,edf->etf", xe, params["experts"]["w_in"]))
  y = jnp.einsum("etf,efd->etd", h, params["experts"]["w_out"])
  return y.sum(0)


def test_moe_expert_stacked_kernels():
  k = jax.random.split(jax.random.key(0), 4)
  params = {"router": jax.random.normal(k[0], (6, 4)),
            "experts": {"w_in": jax.random.normal(k[1], (4, 6, 10)) / 3,
                        "w_out": jax.random.normal(k[2], (4, 10, 6)) / 3}}
  x = jax.random.normal(k[3], (9, 6))
  config = lorajax.LoraConfig(rank=2, targets="experts/.*")
  axes = lorajax.sharding.infer_axes(_moe, params, x, config=config)
  assert set(axes.values()) == {"sio"}
  adapter = _setup(params, dataclasses.replace(config, axes=axes))
  _assert_matches_merged(_moe, params, adapter, x)


class _ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), name="conv1")(x))
    x = nn.Conv(5, (3, 3), strides=2, padding="VALID", name="conv2")(x)
    return x.mean((1, 2))


def test_conv_model():
  model = _ConvNet()
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))
  params = model.init(jax.random.key(1), x)
  config = lorajax.LoraConfig(rank=2, targets=".*conv./kernel",
                              axes={".*conv./kernel": "iiio"})
  assert lorajax.sharding.infer_axes(model.apply, params, x, config=config) == {
      "params/conv1/kernel": "iiio", "params/conv2/kernel": "iiio"}
  _assert_matches_merged(model.apply, params, _setup(params, config), x)


def test_embedding_lookup_and_tied_head():
  table = jax.random.normal(jax.random.key(0), (20, 8))
  params = {"embed": {"embedding": table}}
  ids = jnp.array([[1, 5, 19, 0], [3, 3, 7, 11]])

  def fn(params, ids):
    e = params["embed"]["embedding"]
    return jnp.tanh(e[ids]) @ e.T  # lookup, then the tied output head

  config = lorajax.LoraConfig(rank=3, targets=".*embedding")
  _assert_matches_merged(fn, params, _setup(params, config), ids)
  lookup = lambda p, ids: jnp.take(p["embed"]["embedding"], ids, axis=0)  # noqa
  _assert_matches_merged(lookup, params, _setup(params, config), ids)


def test_nested_jit_remat_cond_while():
  params = {"w": jax.random.normal(jax.random.key(0), (6, 6)) / 2,
            "v": jax.random.normal(jax.random.key(1), (6, 6)) / 2}

  def fn(p, x):
    y = jax.jit(lambda x, w: jnp.tanh(x @ w))(x, p["w"])
    y = jax.checkpoint(lambda y, w: jax.nn.gelu(y @ w.T))(y, p["v"])
    y = jax.lax.cond(y.sum() > 0, lambda y: y @ p["w"], lambda y: -y @ p["v"],
                     y)
    y = jax.lax.fori_loop(0, 2, lambda i, y: jnp.tanh(y @ p["v"]), y)
    return 2.0 * (y @ p["v"])

  x = jax.random.normal(jax.random.key(2), (5, 6))
  adapter = _setup(params, lorajax.LoraConfig(rank=2, targets="w|v"))
  _assert_matches_merged(fn, params, adapter, x)

  def loop(p, x):  # A while_loop: reverse-mode autodiff is not defined.
    return jax.lax.while_loop(
        lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"])),
        (0, x))[1]

  np.testing.assert_allclose(
      jax.jit(lorajax.lora(loop, strict=True))(params, adapter, x),
      loop(lorajax.merge(params, adapter), x), rtol=RTOL, atol=ATOL)
  _, tangent = jax.jvp(lambda ad: lorajax.lora(loop)(params, ad, x),
                       (adapter,), (adapter,))
  _, ref_tangent = jax.jvp(lambda ad: loop(lorajax.merge(params, ad), x),
                           (adapter,), (adapter,))
  np.testing.assert_allclose(tangent, ref_tangent, rtol=1e-3, atol=1e-4)


def test_static_arguments_and_kwargs():
  params = {"w": jax.random.normal(jax.random.key(0), (4, 4))}
  adapter = _setup(params, lorajax.LoraConfig(rank=2, targets="w"))

  def fn(p, x, *, act="tanh", scale=1.0):
    y = x @ p["w"]
    return scale * (jnp.tanh(y) if act == "tanh" else y)

  x = jnp.ones((2, 4))
  got = lorajax.lora(fn)(params, adapter, x, act="none", scale=3.0)
  want = fn(lorajax.merge(params, adapter), x, act="none", scale=3.0)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_vmap_over_adapters():
  params = {"w": jax.random.normal(jax.random.key(0), (6, 5))}
  config = lorajax.LoraConfig(rank=2, targets="w")
  adapters = jax.vmap(lambda k: _perturb(
      lorajax.init(params, config, key=k), k))(jax.random.split(
          jax.random.key(1), 3))
  x = jax.random.normal(jax.random.key(2), (4, 6))
  fn = lambda p, x: jnp.tanh(x @ p["w"])  # noqa: E731
  got = jax.vmap(lorajax.lora(fn), in_axes=(None, 0, None))(params, adapters,
                                                            x)
  for i in range(3):
    one = jax.tree.map(lambda a, i=i: a[i], adapters)
    np.testing.assert_allclose(got[i], fn(lorajax.merge(params, one), x),
                               rtol=RTOL, atol=ATOL)


def test_bfloat16_weights():
  w = jax.random.normal(jax.random.key(0), (32, 16)).astype(jnp.bfloat16)
  params = {"w": w}
  adapter = _setup(params, lorajax.LoraConfig(rank=4, targets="w"))
  x = jax.random.normal(jax.random.key(1), (8, 32)).astype(jnp.bfloat16)
  fn = lambda p, x: x @ p["w"]  # noqa: E731
  got = lorajax.lora(fn)(params, adapter, x)
  assert got.dtype == jnp.bfloat16
  want = x.astype(jnp.float32) @ lorajax.merge(
      {"w": w.astype(jnp.float32)}, adapter)["w"]
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=5e-2,
                             atol=0.3)


# -- it really is factored ----------------------------------------------------


def _dense_weight_dots(jaxpr, shapes):
  """dot_generals anywhere in `jaxpr` whose output has a weight's shape."""
  shapes = {tuple(s) for s in shapes} | {tuple(s[::-1]) for s in shapes}
  found = []
  for eqn in jaxpr.eqns:
    if (eqn.primitive.name == "dot_general"
        and tuple(eqn.outvars[0].aval.shape) in shapes):
      found.append(eqn.outvars[0].aval.shape)
    for sub in jax_compat.jaxprs_in_params(eqn.params):
      found += _dense_weight_dots(sub, shapes)
  return found


def test_gradient_jaxpr_has_no_dense_weight_product():
  model = _LinenBlock(d=16)
  x = jax.random.normal(jax.random.key(0), (3, 7, 16))
  params = model.init(jax.random.key(1), x)
  adapter = _setup(params, lorajax.LoraConfig(rank=4, alpha=8.0))
  shapes = _adapted_shapes(adapter)

  def grad_jaxpr(apply):
    loss = lambda ad: jnp.sum(apply(params, ad, x) ** 2)  # noqa: E731
    return jax.make_jaxpr(jax.grad(loss))(adapter).jaxpr

  merged = grad_jaxpr(lambda p, ad, x: model.apply(lorajax.merge(p, ad), x))
  factored = grad_jaxpr(lorajax.lora(model.apply))
  # The inspection finds the dense products of the merged path...
  assert len(_dense_weight_dots(merged, shapes)) >= 2 * 6
  # ...and none in the factored path's forward or backward pass.
  assert _dense_weight_dots(factored, shapes) == []


# -- fallbacks -------------------------------------------------------------


def test_fallback_is_reported_once_per_trace_and_still_correct():
  params = {"w": jax.random.normal(jax.random.key(0), (4, 4))}
  adapter = _setup(params, lorajax.LoraConfig(rank=2, targets="w"))

  def fn(p, x):
    return x @ p["w"] + jnp.sum(p["w"] ** 2) + jnp.sum(p["w"] ** 2)

  x = jnp.ones((2, 4))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = lorajax.lora(fn)(params, adapter, x)
  msgs = [str(w.message) for w in caught
          if issubclass(w.category, lorajax.LoraFallbackWarning)]
  assert len(msgs) == 1, msgs
  assert "'w'" in msgs[0] and "`integer_pow`" in msgs[0]
  np.testing.assert_allclose(got, fn(lorajax.merge(params, adapter), x),
                             rtol=RTOL, atol=1e-4)


def test_strict_mode_raises_naming_weight_and_op():
  params = {"blk": {"w": jnp.ones((4, 4))}}
  adapter = _setup(params, lorajax.LoraConfig(rank=2, targets=".*w"))
  fn = lambda p, x: x * p["blk"]["w"]  # noqa: E731  (elementwise use)
  with pytest.raises(lorajax.LoraFallbackError,
                     match=r"'blk/w' is used by `mul`.*strict=True"):
    lorajax.lora(fn, strict=True)(params, adapter, jnp.ones((4, 4)))


def test_returned_weight_is_the_merged_weight():
  params = {"w": jax.random.normal(jax.random.key(0), (4, 3))}
  adapter = _setup(params, lorajax.LoraConfig(rank=2, targets="w"))
  with pytest.warns(lorajax.LoraFallbackWarning, match="`output`"):
    got = lorajax.lora(lambda p: p["w"].T)(params, adapter)
  np.testing.assert_allclose(got, lorajax.merge(params, adapter)["w"].T,
                             rtol=1e-6)


def test_adapter_that_does_not_fit():
  params = {"w": jnp.ones((4, 4))}
  adapter = lorajax.init({"w": jnp.ones((4, 5))},
                         lorajax.LoraConfig(rank=2, targets="w"),
                         key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"'w': weight shape \(4, 4\)"):
    lorajax.lora(lambda p, x: x @ p["w"])(params, adapter, jnp.ones((1, 4)))


def test_infer_axes_reports_unused_axes():
  params = {"w": jnp.ones((3, 4, 4))}
  fn = lambda p, x: x @ p["w"].sum(0)  # noqa: E731  (summed, not matmul'd)
  with pytest.raises(ValueError, match=r"'w' \(shape \(3, 4, 4\)\): inferred"):
    lorajax.sharding.infer_axes(fn, params, jnp.ones((2, 4)),
                       config=lorajax.LoraConfig(targets="w"))


# -- indexing stacked weights, shardings, tied heads --------------------------


def _moe_gathered(params, x):
  """Top-1 routing by indexing the expert stack: per-token kernels."""
  ids = jnp.argmax(x @ params["router"], -1)
  w_in = params["experts"]["w_in"][ids]  # gather on the stacked axis
  h = jax.nn.gelu(jnp.einsum("td,tdf->tf", x, w_in))
  w_out = jnp.take(params["experts"]["w_out"], ids, axis=0)
  return jnp.einsum("tf,tfd->td", h, w_out)


def test_moe_expert_kernels_indexed_by_gather():
  k = jax.random.split(jax.random.key(3), 4)
  params = {"router": jax.random.normal(k[0], (6, 4)),
            "experts": {"w_in": jax.random.normal(k[1], (4, 6, 10)) / 3,
                        "w_out": jax.random.normal(k[2], (4, 10, 6)) / 3}}
  x = jax.random.normal(k[3], (9, 6))
  config = lorajax.LoraConfig(rank=2, targets="experts/.*")
  axes = lorajax.sharding.infer_axes(_moe_gathered, params, x, config=config)
  assert axes == {"experts/w_in": "sio", "experts/w_out": "sio"}
  adapter = _setup(params, dataclasses.replace(config, axes=axes))
  _assert_matches_merged(_moe_gathered, params, adapter, x)
  # Per-token adapter slices are gathered, never the merged (4, 6, 10) stack.
  loss = lambda ad: jnp.sum(  # noqa: E731
      lorajax.lora(_moe_gathered, strict=True)(params, ad, x) ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss))(adapter).jaxpr
  assert _dense_weight_dots(jaxpr, _adapted_shapes(adapter)) == []


def test_jit_with_shardings_and_sharding_constraints():
  from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: I001
  mesh = jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  shard = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
  params = {"up": jax.random.normal(jax.random.key(0), (8, 16)) / 3,
            "down": jax.random.normal(jax.random.key(1), (16, 8)) / 3}

  def fn(p, x):
    w = jax.lax.with_sharding_constraint(p["up"], shard(None, "model"))
    h = jax.lax.with_sharding_constraint(jnp.tanh(x @ w),
                                         shard("data", "model"))
    return h @ p["down"]

  adapter = _setup(params, lorajax.LoraConfig(rank=2, targets="up|down"))
  x = jax.random.normal(jax.random.key(2), (8, 8))
  params_s = {"up": jax.device_put(params["up"], shard(None, "model")),
              "down": jax.device_put(params["down"], shard("model", None))}
  x_s = jax.device_put(x, shard("data", None))
  step = jax.jit(jax.value_and_grad(
      lambda ad, p, x: jnp.sum(lorajax.lora(fn, strict=True)(p, ad, x) ** 2)),
      in_shardings=(None, {"up": shard(None, "model"),
                           "down": shard("model", None)}, shard("data", None)),
      out_shardings=(shard(), None))
  val, grads = step(adapter, params_s, x_s)
  ref_val, ref_grads = jax.value_and_grad(
      lambda ad: jnp.sum(fn(lorajax.merge(params, ad), x) ** 2))(adapter)
  np.testing.assert_allclose(val, ref_val, rtol=1e-4)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-4)


def test_tied_head_contracts_output_axis_without_dense_product():
  table = jax.random.normal(jax.random.key(0), (20, 8))
  params = {"embed": {"embedding": table}}
  adapter = _setup(params, lorajax.LoraConfig(rank=3, targets=".*embedding"))
  x = jax.random.normal(jax.random.key(1), (5, 8))
  head = lambda p, x: x @ p["embed"]["embedding"].T  # noqa: E731
  _assert_matches_merged(head, params, adapter, x)
  loss = lambda ad: jnp.sum(lorajax.lora(head)(params, ad, x) ** 2)  # noqa
  jaxpr = jax.make_jaxpr(jax.grad(loss))(adapter).jaxpr
  assert _dense_weight_dots(jaxpr, [(20, 8)]) == []


def test_infer_axes_needs_a_config():
  with pytest.raises(TypeError, match=r"`config` must be a lorajax.LoraConfig"):
    lorajax.sharding.infer_axes(lambda p, x: x @ p["w"],
                                {"w": jnp.ones((2, 2))}, jnp.ones((1, 2)),
                                config={"rank": 2})
