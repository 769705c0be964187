"""`lorajax.make_train_step`: the one train step (optax-style init/step).

References are written out by hand: the gradient of the dense loss
`f(x @ (W + s * a @ b))` with respect to `a` and `b` by `jax.grad` of that
formula, and SGD as `p - lr * g`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lorajax

D_IN, D_OUT, RANK, ALPHA, LR = 6, 4, 2, 4.0, 0.1
SCALE = ALPHA / RANK


def setup(seed=0, dtype=jnp.float32):
  k = jax.random.split(jax.random.key(seed), 4)
  params = {"w": jax.random.normal(k[0], (D_IN, D_OUT)),
            "bias": jnp.zeros(D_OUT)}
  config = lorajax.LoraConfig(rank=RANK, alpha=ALPHA, targets="w")
  adapter = lorajax.init(params, config, key=k[1])
  node = adapter["w"]
  # Perturb b: with b = 0 a gradient test proves little.
  node = dataclasses.replace(
      node, a=node.a.astype(dtype),
      b=(0.3 * jax.random.normal(k[2], node.b.shape)).astype(dtype))
  adapter = {"w": node, "bias": None}
  x = jax.random.normal(k[3], (8, D_IN))
  y = jnp.sin(x[:, :D_OUT])
  return params, adapter, {"x": x, "y": y}


def mse(params, adapter, batch):
  pred = lorajax.lora(lambda p, x: x @ p["w"] + p["bias"])(
      params, adapter, batch["x"])
  return jnp.mean((pred - batch["y"]) ** 2)


def dense_loss(w, a, b, x, y):
  return jnp.mean((x @ (w + SCALE * a @ b) - y) ** 2)


def copy(tree):
  return jax.tree.map(jnp.array, tree)


def test_step_equals_hand_written_sgd():
  params, adapter, batch = setup()
  ts = lorajax.make_train_step(mse, optax.sgd(LR))
  opt_state = ts.init(adapter)
  new, opt_state, metrics = ts.step(params, copy(adapter), opt_state, batch)
  a, b = adapter["w"].a, adapter["w"].b
  want_loss = dense_loss(params["w"], a, b, batch["x"], batch["y"])
  ga, gb = jax.grad(dense_loss, argnums=(1, 2))(params["w"], a, b,
                                                batch["x"], batch["y"])
  np.testing.assert_allclose(float(metrics["loss"]), float(want_loss),
                             rtol=1e-5)
  np.testing.assert_allclose(new["w"].a, a - LR * ga, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["w"].b, b - LR * gb, rtol=1e-5, atol=1e-6)
  want_norm = np.sqrt(np.sum(np.square(ga)) + np.sum(np.square(gb)))
  np.testing.assert_allclose(float(metrics["grad_norm"]), want_norm,
                             rtol=1e-5)
  assert new["bias"] is None and set(metrics) == {"loss", "grad_norm"}


@pytest.mark.parametrize("microbatched", [False, True],
                         ids=["accum_steps", "microbatched"])
def test_accumulation_equals_one_big_batch(microbatched):
  params, adapter, batch = setup(1)
  traces = []

  def counted(p, a, b):
    traces.append(1)
    return mse(p, a, b)

  big = lorajax.make_train_step(mse, optax.adam(1e-2))
  if microbatched:
    acc = lorajax.make_train_step(counted, optax.adam(1e-2),
                                  microbatched=True)
    # Any grouping of rows into equal microbatches gives the mean.
    micro = jax.tree.map(lambda x: x.reshape(4, 2, *x.shape[1:]), batch)
  else:
    acc = lorajax.make_train_step(counted, optax.adam(1e-2), accum_steps=4)
    micro = batch
  s1 = big.init(adapter)
  s2 = acc.init(adapter)
  ad1, s1, m1 = big.step(params, copy(adapter), s1, batch)
  ad2, s2, m2 = acc.step(params, copy(adapter), s2, micro)
  np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]),
                             rtol=1e-5)
  for x, y in zip(jax.tree.leaves(ad2), jax.tree.leaves(ad1)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  ad2, s2, _ = acc.step(params, ad2, s2, micro)  # No retrace.
  assert len(traces) == 1


def test_weighted_accumulation_divides_by_total_weight():
  """Microbatches with different token counts: the step's loss and gradient
  are the sum over all tokens divided by the total count (not the mean of
  microbatch means)."""
  params, adapter, batch = setup(2)
  mask = jnp.asarray([1, 1, 1, 0, 1, 0, 0, 0], jnp.float32)  # 3 vs 1 rows
  batch = {**batch, "m": mask}

  def summed(p, a, b):
    pred = lorajax.lora(lambda p, x: x @ p["w"])(p, a, b["x"])
    per_row = jnp.sum((pred - b["y"]) ** 2, -1) * b["m"]
    return jnp.sum(per_row), jnp.sum(b["m"]) * D_OUT

  ts = lorajax.make_train_step(summed, optax.sgd(LR), weighted=True,
                               accum_steps=2)
  new, _, metrics = ts.step(params, copy(adapter), ts.init(adapter), batch)
  a, b = adapter["w"].a, adapter["w"].b
  rows = np.asarray(mask) > 0
  x, y = batch["x"][rows], batch["y"][rows]
  want = dense_loss(params["w"], a, b, x, y)
  ga, gb = jax.grad(dense_loss, argnums=(1, 2))(params["w"], a, b, x, y)
  np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5)
  assert float(metrics["weight"]) == 4 * D_OUT
  np.testing.assert_allclose(new["w"].a, a - LR * ga, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["w"].b, b - LR * gb, rtol=1e-5, atol=1e-6)


def test_bf16_adapter_accumulates_in_float32():
  params, adapter, batch = setup(3, dtype=jnp.bfloat16)
  ts = lorajax.make_train_step(mse, optax.sgd(LR), accum_steps=4)
  new, _, metrics = ts.step(params, copy(adapter), ts.init(adapter), batch)
  assert new["w"].a.dtype == jnp.bfloat16
  a = adapter["w"].a.astype(jnp.float32)
  b = adapter["w"].b.astype(jnp.float32)
  ga, gb = jax.grad(dense_loss, argnums=(1, 2))(params["w"], a, b,
                                                batch["x"], batch["y"])
  np.testing.assert_allclose(np.asarray(new["w"].b, np.float32),
                             b - LR * gb, rtol=2e-2, atol=2e-2)


def test_has_aux_donation_and_errors():
  params, adapter, batch = setup(4)

  def with_aux(p, a, b):
    loss = mse(p, a, b)
    return loss, {"twice": 2 * loss}

  ts = lorajax.make_train_step(with_aux, optax.sgd(LR), has_aux=True)
  mine = copy(adapter)
  _, _, m = ts.step(params, mine, ts.init(mine), batch)
  np.testing.assert_allclose(float(m["aux"]["twice"]), 2 * float(m["loss"]),
                             rtol=1e-6)
  assert mine["w"].a.is_deleted()  # donated
  keep = lorajax.make_train_step(with_aux, optax.sgd(LR), has_aux=True,
                                 accum_steps=2, donate=False)
  _, _, m = keep.step(params, mine := copy(adapter), keep.init(mine), batch)
  assert not mine["w"].a.is_deleted()
  assert m["aux"]["twice"].shape == (2,)  # one per microbatch
  with pytest.raises(ValueError, match=r"`accum_steps` must be an integer"):
    lorajax.make_train_step(mse, optax.sgd(LR), accum_steps=0)
  bad = lorajax.make_train_step(mse, optax.sgd(LR), accum_steps=3)
  with pytest.raises(ValueError, match=r"(?s)divisible.*x: shape \(8, 6\)"):
    bad.step(params, copy(adapter), bad.init(adapter), batch)
  mb = lorajax.make_train_step(mse, optax.sgd(LR), accum_steps=3,
                               microbatched=True)
  stacked = jax.tree.map(lambda x: x.reshape(2, 4, *x.shape[1:]), batch)
  with pytest.raises(ValueError, match=r"batch holds 2 microbatches"):
    mb.step(params, copy(adapter), mb.init(adapter), stacked)
  ragged = {"x": stacked["x"], "y": batch["y"]}
  with pytest.raises(ValueError, match=r"one common size; got leading"
                     r" sizes \[2, 8\]"):
    mb.step(params, copy(adapter), mb.init(adapter), ragged)
  with pytest.raises(ValueError, match=r"holds no NamedSharding"):
    lorajax.make_train_step(mse, optax.sgd(LR), adapter_shardings={"w": None})


def test_inside_vmap_and_scan():
  """Pure functions: one step per configuration under `vmap`, steps under
  `scan`, inside an outer `jit` (how notebooks/lab.py trains side by side)."""
  params, adapter, batch = setup(5)
  ts = lorajax.make_train_step(mse, optax.sgd(LR))
  twice = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), adapter)

  @jax.jit
  def run(ad):
    def body(carry, _):
      ad, st = carry
      ad, st, m = ts.step(params, ad, st, batch)
      return (ad, st), m["loss"]
    return jax.lax.scan(body, (ad, ts.init(ad)), None, length=3)

  (out, _), losses = jax.vmap(run)(twice)
  assert losses.shape == (2, 3)
  ref = adapter
  for _ in range(3):
    ref, _, _ = ts.step(params, copy(ref), ts.init(ref), batch)
  for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
    np.testing.assert_allclose(y[0], x, rtol=1e-5, atol=1e-6)


def test_shardings_derived_from_param_shardings():
  mesh = jax.make_mesh((4,), ("model",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:4])
  params, adapter, batch = setup(6)
  psh = {"w": NamedSharding(mesh, P(None, "model")),
         "bias": NamedSharding(mesh, P())}
  params = jax.device_put(params, psh)
  ts = lorajax.make_train_step(mse, optax.adam(1e-2), param_shardings=psh,
                               batch_sharding=NamedSharding(mesh, P()))
  adapter = jax.device_put(jax.tree.map(np.asarray, adapter))
  ref = lorajax.make_train_step(mse, optax.adam(1e-2))
  want, _, m_ref = ref.step(jax.tree.map(np.asarray, params), copy(adapter),
                            ref.init(adapter), batch)
  state = ts.init(adapter)
  new, state, m = ts.step(params, adapter, state, batch)
  assert new["w"].b.sharding.spec == P(None, "model")  # follows W's output
  assert state[0].mu["w"].b.sharding.spec == P(None, "model")
  np.testing.assert_allclose(float(m["loss"]), float(m_ref["loss"]),
                             rtol=1e-5)
  for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(want)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
