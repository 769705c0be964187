"""PEFT's methods (DoRA, VeRA, PiSSA, OLoRA, EVA) against PEFT and dense math.

Every method is checked on a tiny random transformers Llama against torch
PEFT (logits both ways, AdamW losses from the same start) and against
independent dense numpy formulas.
"""

import dataclasses
import json
import os

import _testing
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from _llama_testing import random_ids, tiny_torch_llama, torch_logits
from safetensors.numpy import load_file

import lorajax
import lorajax.peft
from lorajax.models import llama

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

SEED = 5
ATOL = 1e-4
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  path = tmp_path_factory.mktemp("base") / "ckpt"
  tiny_torch_llama(seed=SEED).save_pretrained(path)
  model, params = llama.from_pretrained(path)
  return str(path), model, params


_nodes = _testing.nodes_by_path


def _logits(model, params, adapter, ids):
  return {
      "merged": np.asarray(model.apply(lorajax.merge(params, adapter), ids)),
      "factored": np.asarray(jax.jit(lorajax.lora(model.apply, strict=True))(
          params, adapter, ids)),
  }


def _peft_model(method):
  tm = tiny_torch_llama(seed=SEED)
  if method == "vera":
    cfg = peft.VeraConfig(r=8, target_modules=TARGETS, task_type="CAUSAL_LM",
                          projection_prng_key=3)
  else:
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                          use_dora=True, init_lora_weights=False,
                          task_type="CAUSAL_LM")
  pm = peft.get_peft_model(tm, cfg)
  torch.manual_seed(1)
  with torch.no_grad():  # non-trivial trained-looking values
    for name, p in pm.named_parameters():
      if "lora_B" in name or "vera_lambda" in name:
        p.copy_(0.5 * torch.randn_like(p))
      if "lora_magnitude_vector" in name:
        p.mul_(1.0 + 0.3 * torch.randn_like(p))
  return pm


def _torch_loss(pm, ids):
  t = torch.as_tensor(np.array(ids, dtype=np.int64))
  logits = pm(t[:, :-1]).logits
  return torch.nn.functional.cross_entropy(
      logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1))


def _jax_loss(model, params, adapter, ids):
  logits = lorajax.lora(model.apply)(params, adapter, ids[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, ids[:, 1:]).mean()


# -- DoRA and VeRA: PEFT -> lorajax, lorajax -> PEFT, same AdamW losses --------


@pytest.mark.parametrize("method", ["dora", "vera"])
def test_peft_adapter_loads_and_trains_like_peft(base, tmp_path, method):
  _, model, params = base
  pm = _peft_model(method)
  pm.save_pretrained(tmp_path / "ad")
  ids = random_ids(np.random.default_rng(0), 2, 9)
  ref = torch_logits(pm.eval(), ids)
  plain = torch_logits(tiny_torch_llama(seed=SEED), ids)
  assert np.abs(ref - plain).max() > 0.05
  adapter = lorajax.peft.load(tmp_path / "ad", params)
  nodes = _nodes(adapter)
  assert len(nodes) == 2 * len(TARGETS)
  kind = lorajax.VeraWeight if method == "vera" else lorajax.LoraWeight
  assert all(isinstance(n, kind) for n in nodes.values())
  for name, got in _logits(model, params, adapter, ids).items():
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0, err_msg=name)

  # Three AdamW steps in both frameworks from this start: same losses.
  lr, wd = 1e-2, 0.05
  pm.train()
  trainable = [p for p in pm.parameters() if p.requires_grad]
  opt_t = torch.optim.AdamW(trainable, lr=lr, weight_decay=wd)
  tx = optax.adamw(lr, weight_decay=wd, mask=lorajax.optim.decay_mask)
  state = tx.init(adapter)
  ids_j = jnp.asarray(ids)
  step = jax.jit(jax.value_and_grad(
      lambda a: _jax_loss(model, params, a, ids_j)))
  losses_t, losses_j = [], []
  for _ in range(3):
    opt_t.zero_grad()
    loss = _torch_loss(pm, ids)
    loss.backward()
    opt_t.step()
    losses_t.append(loss.item())
    loss_j, g = step(adapter)
    updates, state = tx.update(g, state, adapter)
    adapter = optax.apply_updates(adapter, updates)
    losses_j.append(float(loss_j))
  assert losses_t[-1] < losses_t[0] - 1e-3
  np.testing.assert_allclose(losses_j, losses_t, rtol=0, atol=2e-4)
  if method == "vera":  # the frozen projections did not move
    for p, n in _nodes(adapter).items():
      np.testing.assert_array_equal(n.a, nodes[p].a)
      np.testing.assert_array_equal(n.b, nodes[p].b)


@pytest.mark.parametrize("method", ["dora", "vera"])
def test_lorajax_adapter_loads_in_peft(base, tmp_path, method):
  path, model, params = base
  targets = r"model/layers/\d+/(self_attn/(q|v)_proj|mlp/down_proj)/kernel"
  if method == "vera":
    config = lorajax.VeraConfig(rank=8, targets=targets)
  else:
    config = lorajax.LoraConfig(rank=4, alpha=8.0, targets=targets,
                                use_dora=True)
  adapter = lorajax.init(params, config, key=jax.random.key(0))
  ids = jnp.asarray(random_ids(np.random.default_rng(1), 2, 10))
  tx = optax.adam(3e-2)
  state = tx.init(adapter)

  @jax.jit
  def step(adapter, state):
    g = jax.grad(lambda a: _jax_loss(model, params, a, ids))(adapter)
    updates, state = tx.update(g, state, adapter)
    return optax.apply_updates(adapter, updates), state

  for _ in range(3):
    adapter, state = step(adapter, state)
  lorajax.peft.save(tmp_path / "ad", adapter, base_model_name_or_path=path)
  with open(tmp_path / "ad" / "adapter_config.json") as f:
    saved = json.load(f)
  assert saved["peft_type"] == ("VERA" if method == "vera" else "LORA")
  if method == "dora":
    assert saved["use_dora"] is True
  pm = peft.PeftModel.from_pretrained(tiny_torch_llama(seed=SEED),
                                      tmp_path / "ad").eval()
  ref = torch_logits(pm, np.asarray(ids))
  got = _logits(model, params, adapter, ids)
  for name, g in got.items():
    np.testing.assert_allclose(g, ref, atol=ATOL, rtol=0, err_msg=name)
  assert np.abs(got["merged"] - np.asarray(model.apply(params, ids))).max() > (
      1e-3)
  back = _nodes(lorajax.peft.load(tmp_path / "ad", params))
  for p, n in _nodes(adapter).items():
    for leaf_a, leaf_b in zip(jax.tree.leaves(n), jax.tree.leaves(back[p])):
      np.testing.assert_array_equal(leaf_a, leaf_b)


# -- DoRA: the factored norm, no dense weight, merge/unmerge -----------------


def _perturbed_dora(params, config, key=0):
  """A DoRA adapter with non-zero `b` and magnitudes off the base norms."""

  def one(n):
    k1, k2 = jax.random.split(jax.random.key(n.a.size + key))
    return dataclasses.replace(
        n, b=0.5 * jax.random.normal(k1, n.b.shape),
        magnitude=n.magnitude * (1 + 0.3 * jax.random.normal(
            k2, n.magnitude.shape)))

  @jax.jit  # one compilation instead of one per eager op
  def make(params):
    adapter = lorajax.init(params, config, key=jax.random.key(key))
    return jax.tree.map(one, adapter, is_leaf=lorajax.is_lora)

  return make(params)


def test_dora_factored_norm_matches_dense_formula():
  from lorajax._src.core.adapter import dora_norm  # the function under test

  rng = np.random.default_rng(0)
  w2 = rng.normal(size=(12, 10)).astype(np.float32)
  w4 = rng.normal(size=(3, 12, 2, 5)).astype(np.float32)
  params = {"l": {"kernel": jnp.asarray(w2)}, "m": {"kernel": jnp.asarray(w4)}}
  config = lorajax.LoraConfig(rank=3, alpha=6.0, use_dora=True,
                              axes={"m/kernel": "sioo"})
  adapter = _perturbed_dora(params, config)
  n2 = adapter["l"]["kernel"]
  dense = w2 + 2.0 * np.asarray(n2.a) @ np.asarray(n2.b)
  np.testing.assert_allclose(dora_norm(params["l"]["kernel"], n2),
                             np.linalg.norm(dense, axis=0), rtol=1e-5)
  n4 = adapter["m"]["kernel"]
  dense4 = w4 + 2.0 * np.einsum("sir,sro->sio", np.asarray(n4.a),
                                np.asarray(n4.b).reshape(3, 3, 10)
                                ).reshape(w4.shape)
  np.testing.assert_allclose(dora_norm(params["m"]["kernel"], n4),
                             np.linalg.norm(dense4, axis=1), rtol=1e-5)
  # merge = m * (W + delta) / ||W + delta|| per output column, densely.
  merged = lorajax.merge(params, adapter)["l"]["kernel"]
  want = np.asarray(n2.magnitude) * dense / np.linalg.norm(dense, axis=0)
  np.testing.assert_allclose(merged, want, rtol=1e-5, atol=1e-6)
  # init: m = ||W|| so the adapted model starts at the base.
  fresh = lorajax.init(params, config, key=jax.random.key(0))
  np.testing.assert_allclose(fresh["l"]["kernel"].magnitude,
                             np.linalg.norm(w2, axis=0), rtol=1e-6)
  np.testing.assert_allclose(lorajax.merge(params, fresh)["m"]["kernel"], w4,
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="`unmerge` cannot undo a DoRA merge"):
    lorajax.unmerge(lorajax.merge(params, adapter), adapter)
  with pytest.raises(ValueError, match="needs the weight values"):
    lorajax.init(jax.eval_shape(lambda: params), config, key=jax.random.key(0))


def _dense_weight_dots(jaxpr, shapes):
  shapes = {tuple(s) for s in shapes} | {tuple(s[::-1]) for s in shapes}
  found = []
  for eqn in jaxpr.eqns:
    if (eqn.primitive.name == "dot_general"
        and tuple(eqn.outvars[0].aval.shape) in shapes):
      found.append(eqn.outvars[0].aval.shape)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _dense_weight_dots(sub, shapes)
  return found


def test_dora_factored_gradient_has_no_weight_shaped_dot():
  # A two-matrix MLP block with distinct shapes, DoRA on both.
  rng = np.random.default_rng(1)
  params = {"up": {"kernel": jnp.asarray(rng.normal(size=(16, 24)),
                                         jnp.float32)},
            "down": {"kernel": jnp.asarray(rng.normal(size=(24, 16)),
                                           jnp.float32)}}
  adapter = _perturbed_dora(params, lorajax.LoraConfig(
      rank=4, alpha=8.0, targets=".*", use_dora=True))
  x = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)
  shapes = [(16, 24), (24, 16)]

  def fn(p, x):
    return jax.nn.gelu(x @ p["up"]["kernel"]) @ p["down"]["kernel"]

  def grad_jaxpr(apply):
    loss = lambda ad: jnp.sum(apply(params, ad, x) ** 2)  # noqa: E731
    return (jax.make_jaxpr(jax.grad(loss))(adapter).jaxpr,
            jax.jit(jax.grad(loss))(adapter))

  merged, g_m = grad_jaxpr(lambda p, ad, x: fn(lorajax.merge(p, ad), x))
  factored, g_f = grad_jaxpr(lorajax.lora(fn, strict=True))
  assert len(_dense_weight_dots(merged, shapes)) >= 2
  assert _dense_weight_dots(factored, shapes) == []
  # Same gradients both ways (the norm is a constant in both).
  for a, b in zip(jax.tree.leaves(g_m), jax.tree.leaves(g_f)):
    np.testing.assert_allclose(a, b, rtol=1e-4,
                               atol=1e-5 * float(np.abs(a).max()))


# -- PiSSA / OLoRA ------------------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_6", "olora"])
def test_decompose_reconstructs_weights(init):
  rng = np.random.default_rng(0)
  # A spectrum that decays, so the randomized SVD's top part is accurate.
  u, _ = np.linalg.qr(rng.normal(size=(24, 16)))
  v, _ = np.linalg.qr(rng.normal(size=(16, 16)))
  w = ((u * (0.7 ** np.arange(16))) @ v.T).astype(np.float32)
  params = {"p": {"kernel": jnp.asarray(w)}, "n": jnp.ones(3)}
  config = lorajax.LoraConfig(rank=4, alpha=8.0, targets="p/kernel",
                              init=init)
  before = jax.tree.map(np.array, params)
  residual, adapter = lorajax.decompose(params, config, key=jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, params, before)  # untouched
  node = adapter["p"]["kernel"]
  low = 2.0 * np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)
  np.testing.assert_allclose(np.asarray(residual["p"]["kernel"]) + low, w,
                             atol=2e-6, rtol=0)
  np.testing.assert_allclose(lorajax.merge(residual, adapter)["p"]["kernel"],
                             w, atol=2e-6, rtol=0)
  if init.startswith("pissa"):  # the best rank-4 part (Eckart-Young)
    uu, s, vt = np.linalg.svd(w.astype(np.float64))
    # The randomized SVD (6 power iterations) is accurate to about
    # (s_5 / s_4)^13 ~ 1e-2 of the tail.
    tol = 1e-5 if init == "pissa" else 5e-4
    np.testing.assert_allclose(low, (uu[:, :4] * s[:4]) @ vt[:4], atol=tol)
    np.testing.assert_allclose(np.asarray(node.a).T @ np.asarray(node.a),
                               np.diag(s[:4] / 2.0), atol=tol)
  else:  # OLoRA: W^T = QR, b = Q[:, :r]^T, a = R[:r]^T (PEFT's convention)
    q, r = np.linalg.qr(w.T.astype(np.float64))
    np.testing.assert_allclose(np.abs(np.asarray(node.b)), np.abs(q[:, :4].T),
                               atol=1e-5)
    np.testing.assert_allclose(low, 2.0 * (q[:, :4] @ r[:4]).T, atol=1e-5)
  with pytest.raises(ValueError, match=r"lorajax\.decompose"):
    lorajax.init(params, config, key=jax.random.key(0))


def test_pissa_matches_peft_and_converted_export_on_original_base(
    base, tmp_path):
  path, model, params = base
  targets = r"model/layers/\d+/self_attn/(q|v)_proj/kernel"
  config = lorajax.LoraConfig(rank=4, alpha=8.0, targets=targets,
                              init="pissa")
  residual, initial = lorajax.decompose(params, config, key=jax.random.key(0))
  # PEFT's PiSSA: the same residual base.
  pm = peft.get_peft_model(tiny_torch_llama(seed=SEED), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
      init_lora_weights="pissa"))
  sd = pm.state_dict()
  for i in range(2):
    key = (f"base_model.model.model.layers.{i}.self_attn.q_proj.base_layer"
           ".weight")
    np.testing.assert_allclose(
        residual["model"]["layers"][str(i)]["self_attn"]["q_proj"]["kernel"],
        sd[key].numpy().T, atol=1e-4)
  ids = jnp.asarray(random_ids(np.random.default_rng(2), 2, 8))
  # Same AdamW losses from the same start (singular-vector signs may differ
  # between LAPACK calls; Adam is sign-equivariant, so the losses agree).
  adapter, tx = initial, optax.adamw(1e-2, weight_decay=0.0)
  state = tx.init(adapter)
  opt_t = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad],
                            lr=1e-2, weight_decay=0.0)
  pm.train()

  @jax.jit
  def step(adapter, state):
    loss, g = jax.value_and_grad(
        lambda a: _jax_loss(model, residual, a, ids))(adapter)
    updates, state = tx.update(g, state, adapter)
    return optax.apply_updates(adapter, updates), state, loss

  for _ in range(3):
    opt_t.zero_grad()
    loss_t = _torch_loss(pm, ids)
    loss_t.backward()
    opt_t.step()
    adapter, state, loss = step(adapter, state)
    np.testing.assert_allclose(float(loss), loss_t.item(), atol=2e-4)
  tuned = np.asarray(model.apply(lorajax.merge(residual, adapter), ids))
  assert np.abs(tuned - np.asarray(model.apply(params, ids))).max() > 1e-3
  # Converted export: a rank-8 plain LoRA on the ORIGINAL base.
  lorajax.peft.save(tmp_path / "conv", adapter, initial_adapter=initial)
  with open(tmp_path / "conv" / "adapter_config.json") as f:
    saved = json.load(f)
  assert (saved["r"], saved["lora_alpha"]) == (8, 16.0)
  loaded = peft.PeftModel.from_pretrained(tiny_torch_llama(seed=SEED),
                                          tmp_path / "conv").eval()
  np.testing.assert_allclose(torch_logits(loaded, np.asarray(ids)), tuned,
                             atol=ATOL, rtol=0)
  # ...and in lorajax on the original params.
  conv = lorajax.peft.load(tmp_path / "conv", params)
  np.testing.assert_allclose(_logits(model, params, conv, ids)["factored"],
                             tuned, atol=ATOL, rtol=0)


# -- EVA --------------------------------------------------------------------


def test_eva_init_from_activations_and_rank_pattern_export(base, tmp_path):
  path, model, params = base
  rng = np.random.default_rng(0)
  targets = r"model/layers/\d+/self_attn/(q|v)_proj/kernel"
  config = lorajax.LoraConfig(rank=3, alpha=6.0, targets=targets, init="eva")
  plans = config.plan(params)
  # Activations with different spectra per layer (from steep to flat), with
  # a non-zero mean, three batches each.
  decay = dict(zip(plans, (0.4, 0.5, 0.9, 0.97)))
  scales = {p: d ** np.arange(64.0) for p, d in decay.items()}
  batches = [{p: rng.normal(size=(4, 10, 64)) * s + 0.3
              for p, s in scales.items()} for _ in range(3)]
  adapter, cfg = lorajax.eva_init(params, config, batches)
  for p, n in _nodes(adapter).items():
    x = np.concatenate([b[p].reshape(-1, 64) for b in batches])
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)  # PCA
    a = np.asarray(n.a)
    # The incremental PCA truncates to 2 * rank + 32 components between
    # batches: exact for steep spectra, close for flat ones.
    tol = 1e-4 if decay[p] < 0.6 else 3e-3
    np.testing.assert_allclose(a @ a.T, vt[:3].T @ vt[:3], atol=tol)
    assert not np.asarray(n.b).any()  # starts at the base model
  # Redistribution: same total rank, more for flat spectra, as rank_pattern.
  adapter2, cfg2 = lorajax.eva_init(params, config, batches,
                                    redistribute=True)
  ranks = {p: n.rank for p, n in _nodes(adapter2).items()}
  # Reference: exact PCA ratios of each layer's inputs, the 12 largest of
  # the top-6 per layer pooled (PEFT's rule).
  pooled = []
  for p in plans:
    x = np.concatenate([b[p].reshape(-1, 64) for b in batches])
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    pooled += [(v, p) for v in (s * s / np.sum(s * s))[:6]]
  pooled.sort(key=lambda t: -t[0])
  want = {p: sum(q == p for _, q in pooled[:12]) for p in plans}
  assert ranks == {p: r for p, r in want.items() if r}
  assert len(set(ranks.values())) > 1 and cfg2.rank_pattern
  adapter2 = jax.tree.map(
      lambda n: dataclasses.replace(n, b=0.3 * jnp.ones_like(n.b)),
      adapter2, is_leaf=lorajax.is_lora)
  lorajax.peft.save(tmp_path / "eva", adapter2)
  with open(tmp_path / "eva" / "adapter_config.json") as f:
    saved = json.load(f)
  assert saved["rank_pattern"]
  ids = jnp.asarray(random_ids(np.random.default_rng(3), 1, 6))
  pm = peft.PeftModel.from_pretrained(tiny_torch_llama(seed=SEED),
                                      tmp_path / "eva").eval()
  np.testing.assert_allclose(
      _logits(model, params, adapter2, ids)["factored"],
      torch_logits(pm, np.asarray(ids)), atol=ATOL, rtol=0)
  # Capture through `fn`: the same inputs as torch forward hooks record.
  tm = tiny_torch_llama(seed=SEED)
  seen = {}
  for i in range(2):
    for name in ("q_proj", "v_proj"):
      path = f"model/layers/{i}/self_attn/{name}/kernel"
      mod = getattr(tm.model.layers[i].self_attn, name)
      mod.register_forward_hook(
          lambda m, inp, out, path=path: seen.setdefault(path, []).append(
              inp[0].detach().numpy().reshape(-1, 64)))
  id_batches = [random_ids(np.random.default_rng(k), 2, 7) for k in range(2)]
  for ids in id_batches:
    torch_logits(tm, ids)
  ref = [{p: v[k] for p, v in seen.items()} for k in range(2)]
  got, _ = lorajax.eva_init(params, config,
                            [jnp.asarray(i) for i in id_batches],
                            fn=model.apply)
  want, _ = lorajax.eva_init(params, config, ref)
  for p, n in _nodes(want).items():
    a, b = np.asarray(n.a), np.asarray(_nodes(got)[p].a)
    np.testing.assert_allclose(a @ a.T, b @ b.T, atol=1e-3)
  with pytest.raises(ValueError, match="No activations were given"):
    lorajax.eva_init(params, config, batches[:0])
  with pytest.raises(ValueError, match="last axis must be the weight's d_in"):
    lorajax.eva_init(params, config,
                     [{p: np.ones((2, 7)) for p in plans}])


# -- bookkeeping: optimizers, checkpoints, errors -----------------------------


def test_vera_masks_and_lora_plus_keep_projections_frozen():
  params = {"a": {"kernel": jnp.ones((6, 5))},
            "b": {"kernel": jnp.ones((4, 6))}}
  adapter = lorajax.init(params, lorajax.VeraConfig(rank=3, targets=".*"),
                         key=jax.random.key(0))
  va, vb = adapter["a"]["kernel"], adapter["b"]["kernel"]
  # One shared pair, sliced: the (4, 6) weight uses the top rows of `a`.
  np.testing.assert_array_equal(vb.a, va.a[:4])
  np.testing.assert_array_equal(va.b, vb.b[:, :5])
  # Trained: lambda_d (3) + lambda_b (d_out) per weight.
  assert lorajax.summary(params, adapter).trainable == (3 + 5) + (3 + 6)
  mask = lorajax.optim.decay_mask(adapter)["a"]["kernel"]
  assert (mask.lambda_d, mask.lambda_b, mask.a, mask.b) == (
      True, True, False, False)
  grads = jax.tree.map(jnp.ones_like, adapter)
  tx = lorajax.optim.lora_plus(1e-2, weight_decay=0.1)
  updates, _ = tx.update(grads, tx.init(adapter), adapter)
  assert not np.asarray(updates["a"]["kernel"].a).any()
  assert np.asarray(updates["a"]["kernel"].lambda_b).all()


def test_checkpoint_records_the_method(tmp_path):
  params = {"w": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))}}
  config = lorajax.LoraConfig(rank=2, targets="w/kernel", use_dora=True)
  adapter = _perturbed_dora(params, config)
  with lorajax.CheckpointManager(tmp_path / "ck", config,
                                 async_save=False) as mgr:
    mgr.save(1, adapter)
    assert mgr.metadata(1)["weights"][0]["method"] == "dora"
    assert mgr.saved_config(1).use_dora
    assert lorajax.summary(params, adapter).trainable == 8 * 2 + 2 * 6 + 6
    got, _, _ = mgr.restore(adapter=adapter)
    np.testing.assert_array_equal(got["w"]["kernel"].magnitude,
                                  adapter["w"]["kernel"].magnitude)
    plain = lorajax.init(params, dataclasses.replace(config, use_dora=False),
                         key=jax.random.key(0))
    with pytest.raises(ValueError, match="holds a 'dora' adapter"):
      mgr.restore(adapter=plain)


def test_method_errors(base, tmp_path):
  _, _, params = base
  with pytest.raises(ValueError, match="'pissa_niter_K'"):
    lorajax.LoraConfig(init="pissa_niter_x")
  with pytest.raises(ValueError, match="VeRA adapts 2-D"):
    lorajax.VeraConfig(rank=2, targets="w").plan({"w": jnp.ones((2, 3, 4))})
  cfg = lorajax.LoraConfig(rank=2, targets=r".*q_proj/kernel", init="olora")
  _, a0 = lorajax.decompose(params, cfg, key=jax.random.key(0))
  other = lorajax.init(params, lorajax.LoraConfig(rank=3, targets=r".*q_proj/"
                                                  "kernel"),
                       key=jax.random.key(0))
  with pytest.raises(ValueError, match="`to_lora` cannot convert"):
    lorajax.peft.to_lora(other, a0)
  # PEFT VeRA without saved projections cannot be reproduced in JAX.
  with pytest.warns(UserWarning, match="not save vera_A and vera_B"):
    pm = peft.get_peft_model(tiny_torch_llama(seed=SEED), peft.VeraConfig(
        r=4, target_modules=["q_proj"], save_projection=False))
  pm.save_pretrained(tmp_path / "v")
  with pytest.raises(ValueError, match="save_projection=false"):
    lorajax.peft.load(tmp_path / "v", params)
  # A tensor file that misses a DoRA magnitude names it.
  dora = _perturbed_dora(params, lorajax.LoraConfig(
      rank=2, targets=r".*q_proj/kernel", use_dora=True))
  lorajax.peft.save(tmp_path / "d", dora)
  tensors = load_file(os.path.join(tmp_path / "d",
                                   "adapter_model.safetensors"))
  assert sum("lora_magnitude_vector" in k for k in tensors) == 2
