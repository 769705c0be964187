"""Adapter sets: per-example adapters, multi-tenant training, hot swap,
generation with mixed ids, and weighted combination against PEFT."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax import multi
from lorajax.models import llama

STRATEGIES = ("gather", "onehot", "ragged")


def _perturbed(adapter, key, scale=0.3):
  """Non-zero `b` (and a perturbed `a`): B = 0 would prove nothing."""
  leaves, treedef = jax.tree.flatten(adapter)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([
      x + scale * jax.random.normal(k, x.shape, x.dtype)
      for x, k in zip(leaves, keys)])


def _mlp(params, x):
  h = jnp.tanh(x @ params["w1"]["kernel"])
  return h @ params["w2"]["kernel"]


@pytest.fixture(scope="module")
def mlp():
  k = jax.random.split(jax.random.key(0), 8)
  params = {"w1": {"kernel": jax.random.normal(k[0], (8, 12)) / 3},
            "w2": {"kernel": jax.random.normal(k[1], (12, 6)) / 3}}
  adapters = {
      name: _perturbed(lorajax.init(params, lorajax.LoraConfig(
          rank=rank, alpha=alpha), key=k[2 + i]), k[5 + i])
      for i, (name, rank, alpha) in enumerate(
          [("r2", 2, 4.0), ("r4", 4, 2.0), ("r3", 3, 3.0)])}
  return params, adapters


def _reference(fn, params, adapters, ids, x):
  """Each example alone, through the dense merged weights."""
  outs = []
  for e, i in enumerate(ids):
    p = params if i < 0 else lorajax.merge(params, adapters[i])
    outs.append(fn(p, x[e:e + 1]))
  return jnp.concatenate(outs)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mixed_batch_equals_each_example_alone(mlp, strategy):
  params, named = mlp
  aset = multi.build(named)
  adapters = [named[n] for n in aset.names]
  ids = [0, 2, multi.BASE_ID, 1, 2, 0]
  x = jax.random.normal(jax.random.key(3), (6, 5, 8))
  got = jax.jit(multi.lora(_mlp, strategy=strategy))(
      params, aset.weights, jnp.array(ids), x)
  want = _reference(_mlp, params, adapters, ids, x)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)

  # Gradients: slot k only from its own examples.
  def loss_set(w):
    y = multi.lora(_mlp, strategy=strategy)(params, w, jnp.array(ids), x)
    return jnp.sum(jnp.sin(y))

  g = jax.grad(loss_set)(aset.weights)
  for k, ad in enumerate(adapters):
    mine = [e for e, i in enumerate(ids) if i == k]

    def loss_one(a, mine=mine):
      y = _mlp(lorajax.merge(params, a), x[jnp.array(mine)])
      return jnp.sum(jnp.sin(y))

    # Padded dense-merge gradients w.r.t. a and b of this slot alone.
    want_g = jax.grad(loss_one)(ad)
    for path in ("w1", "w2"):
      node, ref = g[path]["kernel"], want_g[path]["kernel"]
      r = ref.rank
      np.testing.assert_allclose(node.a[k, :, :r], ref.a, atol=1e-4,
                                 rtol=1e-4)
      np.testing.assert_allclose(node.b[k, :r], ref.b, atol=1e-4, rtol=1e-4)
      # Padding stays exactly zero.
      assert not np.any(node.a[k, :, r:]) and not np.any(node.b[k, r:])


def test_per_token_ids(mlp):
  params, named = mlp
  aset = multi.build(named)
  adapters = [named[n] for n in aset.names]
  x = jax.random.normal(jax.random.key(4), (3, 4, 8))
  ids = jnp.array([[0, 1, 2, -1], [2, 2, 0, 1], [-1, -1, 1, 0]])
  want = jnp.stack([
      jnp.stack([(_mlp(params, x[e, t]) if ids[e, t] < 0 else _mlp(
          lorajax.merge(params, adapters[ids[e, t]]), x[e, t]))
                 for t in range(4)]) for e in range(3)])
  for strategy in STRATEGIES:
    got = multi.lora(_mlp, strategy=strategy)(params, aset, ids, x)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5,
                               err_msg=strategy)


def test_set_management_and_slots(mlp, tmp_path):
  params, named = mlp
  aset = multi.build(named, max_rank=6, num_slots=4)
  assert aset.num_slots == 4 and aset.max_rank == 6
  assert aset.names == ("r2", "r4", "r3", None)
  back = aset.adapter("r4")
  np.testing.assert_array_equal(back["w1"]["kernel"].a,
                                named["r4"]["w1"]["kernel"].a)
  assert back["w1"]["kernel"].alpha == 2.0
  aset2 = multi.add(aset, named["r2"], name="again")
  assert aset2.names[3] == "again"
  aset3 = multi.remove(aset2, "r4")
  assert aset3.names[1] is None
  assert not np.any(aset3.weights["w1"]["kernel"].a[1])
  with pytest.raises(ValueError, match="rank 4 exceeds"):
    multi.replace(multi.build([named["r2"]]), 0, named["r4"])
  with pytest.raises(ValueError, match="already used"):
    multi.add(aset, named["r3"], name="r3")
  # Save / load: one PEFT directory per slot.
  multi.save(tmp_path / "set", aset)
  assert sorted(p.name for p in (tmp_path / "set").iterdir()) == [
      "r2", "r3", "r4"]
  loaded = multi.load(tmp_path / "set", params)
  for name in ("r2", "r3", "r4"):
    got, want = loaded.adapter(name), named[name]
    for path in ("w1", "w2"):
      np.testing.assert_allclose(
          lorajax.delta(got[path]["kernel"]),
          lorajax.delta(want[path]["kernel"]), atol=1e-6)
  with pytest.raises(ValueError, match="per-example adapter ids"):
    lorajax.lora(_mlp)(params, aset.weights, jnp.ones((2, 8)))
  with pytest.raises(ValueError, match="do not match"):
    multi.lora(_mlp)(params, aset, jnp.zeros((3,), int), jnp.ones((2, 8)))


def test_hot_swap_does_not_retrace(mlp):
  params, named = mlp
  aset = multi.build(named, max_rank=4)
  traces = []

  @jax.jit
  def run(w, ids, x):
    traces.append(1)
    return multi.lora(_mlp)(params, w, ids, x)

  x = jax.random.normal(jax.random.key(5), (3, 8))
  ids = jnp.array([0, 1, 2])
  run(aset.weights, ids, x)
  new = _perturbed(lorajax.init(params, lorajax.LoraConfig(rank=2, alpha=7.),
                                key=jax.random.key(9)), jax.random.key(10))
  swapped = multi.replace(aset, "r4", new, name="new")
  got = run(swapped.weights, jnp.array([1, 1, 0]), x)
  got2 = run(swapped.weights, jnp.array([2, 0, 1]), x)
  assert len(traces) == 1
  want = _mlp(lorajax.merge(params, new), x)
  np.testing.assert_allclose(got[:2], want[:2], atol=2e-5)
  np.testing.assert_allclose(got2[2], want[2], atol=2e-5)


def test_two_adapters_trained_in_one_step_equal_each_alone(mlp):
  params, named = mlp
  a0, a1 = named["r4"], _perturbed(named["r4"], jax.random.key(11))
  aset = multi.build([a0, a1])
  x = jax.random.normal(jax.random.key(6), (4, 8))
  y = jax.random.normal(jax.random.key(7), (4, 6))
  ids = jnp.array([0, 1, 1, 0])
  tx = optax.adamw(1e-2, weight_decay=0.1)
  ptx = multi.per_slot(tx)

  def set_loss(w):
    out = multi.lora(_mlp)(params, w, ids, x)
    # Sum of per-example losses: each slot's part is its own loss.
    return jnp.sum((out - y) ** 2)

  w, state = aset.weights, ptx.init(aset.weights)
  active = multi.active_slots(ids, 2)
  for _ in range(3):
    g = jax.grad(set_loss)(w)
    up, state = ptx.update(g, state, w, active=active)
    w = optax.apply_updates(w, up)

  for k, start in enumerate((a0, a1)):
    ad = start
    mine = jnp.where(ids == k)[0]

    def loss(a, mine=mine):
      return jnp.sum((lorajax.lora(_mlp)(params, a, x[mine]) - y[mine]) ** 2)

    st = tx.init(ad)
    for _ in range(3):
      up, st = tx.update(jax.grad(loss)(ad), st, ad)
      ad = optax.apply_updates(ad, up)
    for path in ("w1", "w2"):
      np.testing.assert_allclose(w[path]["kernel"].a[k], ad[path]["kernel"].a,
                                 atol=1e-5)
      np.testing.assert_allclose(w[path]["kernel"].b[k], ad[path]["kernel"].b,
                                 atol=1e-5)
  # The scale never trains.
  np.testing.assert_array_equal(w["w1"]["kernel"].scale,
                                aset.weights["w1"]["kernel"].scale)
  # A slot absent from the batch keeps its weights and state.
  g = jax.grad(set_loss)(w)
  up, _ = ptx.update(g, state, w, active=jnp.array([True, False]))
  assert not np.any(up["w1"]["kernel"].a[1])


@pytest.fixture(scope="module")
def tiny_llama():
  config = llama.LlamaConfig(vocab_size=64, hidden_size=32,
                             intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
  params = llama.init_params(config, key=jax.random.key(0))
  adapters = [
      _perturbed(lorajax.init(params, lorajax.LoraConfig(
          rank=r, alpha=8.0), key=jax.random.key(20 + r)),
                 jax.random.key(30 + r), scale=0.5)
      for r in (2, 4)]
  return config, params, adapters


def test_llama_logits_and_generation_with_mixed_ids(tiny_llama):
  config, params, adapters = tiny_llama
  model = llama.LlamaModel(config)
  aset = multi.build(adapters)
  ids = jnp.array([[3, 9, 4, 1, 7], [5, 5, 2, 8, 1], [9, 1, 1, 3, 3],
                   [2, 6, 6, 6, 4]])
  adapter_ids = [1, multi.BASE_ID, 0, 1]
  logits = multi.lora(model.apply)(params, aset, jnp.array(adapter_ids), ids)
  for e, i in enumerate(adapter_ids):
    p = params if i < 0 else lorajax.merge(params, adapters[i])
    np.testing.assert_allclose(logits[e], model.apply(p, ids[e:e + 1])[0],
                               atol=2e-4, rtol=2e-4)

  out = model.generate(params, ids, 5, eos_id=-1, adapter=aset,
                       adapter_ids=adapter_ids)
  for e, i in enumerate(adapter_ids):
    p = params if i < 0 else lorajax.merge(params, adapters[i])
    want = model.generate(p, ids[e:e + 1], 5, eos_id=-1)
    np.testing.assert_array_equal(out[e], want[0])
  # The adapters change the output (the test would catch ignored ids).
  assert not np.array_equal(out[1], out[3])
  # New ids and a swapped slot: same compiled program.
  from lorajax._src.models import llama as llama_src

  before = llama_src._generate._cache_size()
  swapped = multi.replace(aset, 1, adapters[0])
  out2 = model.generate(params, ids, 5, eos_id=-1, adapter=swapped,
                        adapter_ids=[0, 1, 1, multi.BASE_ID])
  assert llama_src._generate._cache_size() == before
  want0 = model.generate(lorajax.merge(params, adapters[0]), ids[:3], 5,
                         eos_id=-1)
  np.testing.assert_array_equal(out2[:3], want0)


# -- weighted combination against PEFT ----------------------------------------

COMBOS = [
    ("linear", {}), ("cat", {}), ("svd", {}),
    ("svd", {"svd_rank": 3}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.6, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.4}),
    ("ties_svd", {"density": 0.5}), ("magnitude_prune_svd", {"density": 0.5}),
    ("dare_linear", {"density": 0.5}), ("dare_ties", {"density": 0.7}),
    ("dare_ties", {"density": 0.5, "majority_sign_method": "frequency"}),
]


@pytest.fixture(scope="module")
def peft_pair():
  import peft
  import torch

  from tests._llama_testing import tiny_torch_llama

  tm = tiny_torch_llama(hidden_size=16, intermediate_size=24,
                        num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1)
  torch.manual_seed(0)
  cfg = dict(r=4, target_modules=["q_proj", "v_proj"],
             init_lora_weights=False)
  pm = peft.get_peft_model(tm, peft.LoraConfig(lora_alpha=8, **cfg),
                           adapter_name="x")
  pm.add_adapter("y", peft.LoraConfig(lora_alpha=3, **cfg))
  modules = {n: m for n, m in pm.base_model.model.named_modules()
             if n.endswith(("q_proj", "v_proj"))}
  ours = []
  for name, alpha in (("x", 8.0), ("y", 3.0)):
    ours.append({n.replace(".", "/"): lorajax.LoraWeight(
        jnp.asarray(m.lora_A[name].weight.detach().numpy().T),
        jnp.asarray(m.lora_B[name].weight.detach().numpy().T), alpha)
                 for n, m in modules.items()})
  return pm, modules, ours


@pytest.mark.parametrize("ctype,kw", COMBOS,
                         ids=[f"{c}-{i}" for i, (c, _) in enumerate(COMBOS)])
def test_add_weighted_adapter_matches_peft(peft_pair, ctype, kw, monkeypatch):
  from peft.utils import merge_utils

  pm, modules, ours = peft_pair
  weights = [0.7, -1.3]
  key = jax.random.key(42)
  if ctype.startswith("dare"):
    # Reproducible randomness on both sides: PEFT's Bernoulli masks are
    # replaced by lorajax's (`multi.dare_mask`), found by tensor value.
    masks = {}
    for k, ad in enumerate(ours):
      for path, node in ad.items():
        for which, t in ((0, node.a), (1, node.b)):
          m = multi.dare_mask(key, path, which, k, t.shape,
                              density=kw["density"])
          masks[np.ascontiguousarray(np.asarray(t).T).tobytes()] = m.T

    def random_pruning(tensor, density, rescale):
      m = masks[np.ascontiguousarray(tensor.detach().numpy()).tobytes()]
      out = tensor * merge_utils.torch.as_tensor(m)
      return out / density if rescale else out

    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)
  name = f"c{COMBOS.index((ctype, kw))}"
  pm.add_weighted_adapter(["x", "y"], weights, name, combination_type=ctype,
                          **kw)
  got = multi.add_weighted_adapter(ours, weights, combination_type=ctype,
                                   key=key, **kw)
  for n, m in modules.items():
    want = m.get_delta_weight(name).detach().numpy().T
    node = got[n.replace(".", "/")]
    assert node.rank == m.r[name]
    np.testing.assert_allclose(lorajax.delta(node), want, atol=2e-5,
                               rtol=1e-4)
    assert abs(want).max() > 1e-3  # Not a trivially zero combination.


def test_dare_masks_keep_density_fraction():
  t = jnp.ones((200, 8))
  m = multi.dare_mask(jax.random.key(0), "w", 0, 0, t.shape, density=0.3)
  assert abs(m.mean() - 0.3) < 0.03
  ad = {"w": lorajax.LoraWeight(jnp.ones((8, 4)), jnp.ones((4, 8)), 4.0)}
  # density 1: DARE keeps everything, so it equals linear.
  lin = multi.add_weighted_adapter([ad, ad], [0.5, 0.25],
                                   combination_type="linear")
  dare = multi.add_weighted_adapter([ad, ad], [0.5, 0.25],
                                    combination_type="dare_linear",
                                    density=1.0, key=jax.random.key(0))
  np.testing.assert_allclose(lorajax.delta(dare["w"]),
                             lorajax.delta(lin["w"]), rtol=1e-6)
  with pytest.raises(ValueError, match="key="):
    multi.add_weighted_adapter([ad, ad], [1, 1], combination_type="dare_ties",
                               density=0.5)


def test_svd_clamp_bounds_the_factors(peft_pair):
  # PEFT's clamp level is a quantile of the SVD factors, whose signs are
  # not unique (LAPACK's choice), so it is checked here by its definition.
  _, _, ours = peft_pair
  got = multi.add_weighted_adapter(ours, [1.0, 0.5], combination_type="svd",
                                   svd_clamp=0.8)
  for node in got.values():
    a, b = np.asarray(node.a), np.asarray(node.b)
    vals = np.abs(np.concatenate([a.ravel(), b.ravel()]))
    assert np.mean(vals >= vals.max() - 1e-7) > 0.05  # Some were clamped.


def test_scanned_stacked_weights():
  # Layers stacked on axis 0 ("sio") and run by lax.scan: the slot factors
  # are sliced per layer with the weight.
  k = jax.random.split(jax.random.key(50), 4)
  params = {"w": jax.random.normal(k[0], (3, 6, 6)) / 2.5}

  def fn(p, x):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]

  cfg = lambda r: lorajax.LoraConfig(rank=r, alpha=2.0,  # noqa: E731
                                     targets="w", axes={"w": "sio"})
  ads = [_perturbed(lorajax.init(params, cfg(r), key=k[1 + i]), k[3])
         for i, r in enumerate((1, 3))]
  aset = multi.build(ads)
  x = jax.random.normal(k[3], (4, 2, 6))
  ids = [1, 0, multi.BASE_ID, 1]
  for strategy in STRATEGIES:
    got = multi.lora(fn, strategy=strategy)(params, aset, jnp.array(ids), x)
    np.testing.assert_allclose(got, _reference(fn, params, ads, ids, x),
                               atol=2e-5, err_msg=strategy)
