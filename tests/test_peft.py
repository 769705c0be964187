"""lorajax.peft against torch PEFT on a tiny random Llama."""

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
from safetensors.numpy import load_file, save_file

import lorajax
import lorajax.peft
from lorajax.models import llama

# transformers' own deprecation warning, raised inside PEFT's model wrapping.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

ATOL = 1e-4
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
       "down_proj")
SEED = 11


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  path = tmp_path_factory.mktemp("base") / "ckpt"
  tiny_torch_llama(seed=SEED).save_pretrained(path)
  model, params = llama.from_pretrained(path)
  return str(path), model, params


def _adapted_logits(model, params, adapter, ids) -> dict[str, np.ndarray]:
  """Logits of the adapted model by every lorajax execution path."""
  return {
      "merged": np.asarray(model.apply(lorajax.merge(params, adapter), ids)),
      "factored": np.asarray(jax.jit(lorajax.lora(model.apply, strict=True))(
          params, adapter, ids)),
  }


_nodes = _testing.nodes_by_path


def _peft_model(rslora: bool, **kw):
  tm = tiny_torch_llama(seed=SEED)
  cfg = peft.LoraConfig(
      r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
      use_rslora=rslora, task_type="CAUSAL_LM",
      rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
      alpha_pattern={"v_proj": 3.0}, **kw,
  )
  pm = peft.get_peft_model(tm, cfg).eval()
  torch.manual_seed(1)
  with torch.no_grad():  # B non-zero and of a size that moves the logits
    for name, p in pm.named_parameters():
      if "lora_B" in name:
        p.copy_(0.3 * torch.randn_like(p))
  return pm


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_peft_to_lorajax_logits(base, tmp_path, rslora):
  path, model, params = base
  pm = _peft_model(rslora)
  pm.save_pretrained(tmp_path / "ad")
  ids = random_ids(np.random.default_rng(0), 2, 9)
  ref = torch_logits(pm, ids)
  plain = torch_logits(tiny_torch_llama(seed=SEED), ids)
  assert np.abs(ref - plain).max() > 0.05
  adapter = lorajax.peft.load(tmp_path / "ad", params)
  nodes = _nodes(adapter)
  assert len(nodes) == 7 * 2
  assert {p.split("/")[-2] for p in nodes} == set(ALL)
  denom = np.sqrt if rslora else (lambda r: r)
  q = nodes["model/layers/0/self_attn/q_proj/kernel"]
  v = nodes["model/layers/1/self_attn/v_proj/kernel"]
  down1 = nodes["model/layers/1/mlp/down_proj/kernel"]
  down0 = nodes["model/layers/0/mlp/down_proj/kernel"]
  assert (q.rank, down1.rank, down0.rank) == (2, 6, 4)
  np.testing.assert_allclose(q.scale, 8 / denom(2))
  np.testing.assert_allclose(v.scale, 3.0 / denom(4))
  for name, got in _adapted_logits(model, params, adapter, ids).items():
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0, err_msg=name)


def _train(model, params, adapter, ids, steps=4):
  opt = optax.adam(3e-2)
  state = opt.init(adapter)

  def loss_fn(ad):
    logits = model.apply(lorajax.merge(params, ad), ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, ids[:, 1:]).mean()

  @jax.jit
  def step(ad, state):
    loss, g = jax.value_and_grad(loss_fn)(ad)
    updates, state = opt.update(g, state, ad)
    return optax.apply_updates(ad, updates), state, loss

  losses = []
  for _ in range(steps):
    adapter, state, loss = step(adapter, state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  return adapter


@pytest.mark.parametrize(
    "cfg",
    [
        dict(rank=4, alpha=16.0, rank_pattern={"q_proj": 2},
             alpha_pattern={"layers/1/mlp/up_proj": 5.0}),
        dict(rank=3, alpha=6.0, use_rslora=True, rank_pattern={"o_proj": 2}),
        dict(rank=2, alpha=4.0,
             targets=r"model/layers/0/self_attn/(q|v)_proj/kernel"),
    ],
    ids=["patterns", "rslora", "partial"],
)
def test_lorajax_to_peft_logits(base, tmp_path, cfg):
  path, model, params = base
  adapter = lorajax.init(params, lorajax.LoraConfig(**cfg),
                         key=jax.random.key(0))
  ids = jnp.asarray(random_ids(np.random.default_rng(1), 2, 10))
  adapter = _train(model, params, adapter, ids)
  lorajax.peft.save(tmp_path / "ad", adapter, base_model_name_or_path=path,
                    note={"steps": 4})
  assert sorted(os.listdir(tmp_path)) == ["ad"]  # no temp dirs left
  with open(tmp_path / "ad" / "adapter_config.json") as f:
    saved = json.load(f)
  assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM"
  assert saved["base_model_name_or_path"] == path
  assert saved["use_rslora"] == cfg.get("use_rslora", False)
  assert saved["r"] == cfg["rank"] and saved["lora_alpha"] == cfg["alpha"]
  if "targets" in cfg:
    assert saved["target_modules"] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
  else:
    assert sorted(saved["target_modules"]) == sorted(ALL)
  tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
  a = tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"]
  b = tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
  node = adapter["model"]["layers"]["0"]["self_attn"]["v_proj"]["kernel"]
  np.testing.assert_array_equal(a, np.asarray(node.a).T)
  np.testing.assert_array_equal(b, np.asarray(node.b).T)
  assert np.abs(b).max() > 0  # trained

  pm = peft.PeftModel.from_pretrained(tiny_torch_llama(seed=SEED),
                                      tmp_path / "ad").eval()
  ref = torch_logits(pm, np.asarray(ids))
  got = _adapted_logits(model, params, adapter, ids)["merged"]
  np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
  assert np.abs(got - np.asarray(model.apply(params, ids))).max() > 1e-3

  # And back: the loaded adapter is the saved one.
  back = _nodes(lorajax.peft.load(tmp_path / "ad", params))
  for p, n in _nodes(adapter).items():
    np.testing.assert_array_equal(back[p].a, n.a)
    np.testing.assert_array_equal(back[p].b, n.b)
    np.testing.assert_allclose(back[p].scale, n.scale, rtol=1e-6)


def test_save_overwrite(base, tmp_path):
  _, _, params = base
  adapter = lorajax.init(params, lorajax.LoraConfig(rank=2),
                         key=jax.random.key(0))
  lorajax.peft.save(tmp_path / "ad", adapter)
  with pytest.raises(ValueError, match=r"exists and is not empty.*overwrite"):
    lorajax.peft.save(tmp_path / "ad", adapter)
  lorajax.peft.save(tmp_path / "ad", adapter, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["ad"]


def _relabel(params):
  """Params in a non-HF layout: blocks/<i>/<name>/w."""
  out = {"embed": params["model"]["embed_tokens"], "blocks": {}}
  for i, layer in params["model"]["layers"].items():
    out["blocks"][i] = {
        n: {"w": layer[g][n]["kernel"]}
        for g in ("self_attn", "mlp") for n in layer[g]
    }
  return out


def _hf_module(path):
  parts = path.split("/")
  if parts[0] != "blocks" or parts[-1] != "w":
    return None
  group = "mlp" if parts[2] in ("gate_proj", "up_proj", "down_proj") else (
      "self_attn")
  return f"model.layers.{parts[1]}.{group}.{parts[2]}"


def test_name_map_for_other_layouts(base, tmp_path):
  _, _, params = base
  pm = _peft_model(False)
  pm.save_pretrained(tmp_path / "ad")
  ref = _nodes(lorajax.peft.load(tmp_path / "ad", params))
  custom = _relabel(params)
  got = _nodes(lorajax.peft.load(tmp_path / "ad", custom, name_map=_hf_module))
  assert len(got) == len(ref) == 14
  for p, n in got.items():
    r = ref[_hf_module(p).replace(".", "/") + "/kernel"]
    np.testing.assert_array_equal(n.a, r.a)
    assert n.scale == r.scale
  # dict form, and save with a name map writes the HF names.
  paths = list(_testing.leaves_by_path(custom))
  table = {p: _hf_module(p) for p in paths if _hf_module(p)}
  ad = lorajax.peft.load(tmp_path / "ad", custom, name_map=table)
  lorajax.peft.save(tmp_path / "out", ad, name_map=table)
  keys = load_file(tmp_path / "out" / "adapter_model.safetensors")
  assert "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight" in keys


# ---------------------------------------------------------------------------
# Errors.


def _edit_config(directory, **changes):
  p = os.path.join(directory, "adapter_config.json")
  with open(p) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(p, "w") as f:
    json.dump(cfg, f)


@pytest.fixture
def saved(base, tmp_path):
  _, _, params = base
  adapter = lorajax.init(params, lorajax.LoraConfig(rank=2),
                         key=jax.random.key(0))
  lorajax.peft.save(tmp_path / "ad", adapter)
  return str(tmp_path / "ad"), params


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(peft_type="LOHA"), "peft_type 'LOHA'"),
        # DoRA loads (tests/test_methods.py); without magnitudes it is
        # incomplete.
        (dict(use_dora=True), "lora_magnitude_vector is missing"),
        (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'.*"
         "path_initial_model_for_weight_conversion"),
        (dict(fan_in_fan_out=True), "fan_in_fan_out=true"),
        (dict(bias="all"), "bias='all'"),
        (dict(lora_bias=True), "lora_bias=true"),
        (dict(modules_to_save=["lm_head"]), r"modules_to_save=\['lm_head'\]"),
        (dict(r=3), "rank 2 but adapter_config.json says r=3"),
    ],
    ids=["loha", "dora", "pissa", "fan_in_fan_out",
         "bias", "lora_bias",
         "modules_to_save", "rank"],
)
def test_load_rejects_config(saved, change, match):
  directory, params = saved
  _edit_config(directory, **change)
  with pytest.raises(ValueError, match=match):
    lorajax.peft.load(directory, params)


def test_load_rejects_tensors(saved):
  directory, params = saved
  wpath = os.path.join(directory, "adapter_model.safetensors")
  tensors = load_file(wpath)
  q = "base_model.model.model.layers.0.self_attn.q_proj"
  bad = dict(tensors)
  bad[q.replace("layers.0", "layers.7") + ".lora_A.weight"] = bad[
      q + ".lora_A.weight"]
  bad[q.replace("layers.0", "layers.7") + ".lora_B.weight"] = bad[
      q + ".lora_B.weight"]
  save_file(bad, wpath)
  with pytest.raises(ValueError, match=r"(?s)model.layers.7.self_attn.q_proj:"
                     " no weight in `params`.*name_map"):
    lorajax.peft.load(directory, params)
  bad = dict(tensors)
  del bad[q + ".lora_B.weight"]
  save_file(bad, wpath)
  with pytest.raises(ValueError, match=r"q_proj: lora_B.weight is missing"):
    lorajax.peft.load(directory, params)
  bad = dict(tensors)
  bad[q + ".lora_A.weight"] = np.zeros((2, 32), np.float32)
  save_file(bad, wpath)
  with pytest.raises(ValueError, match=r"(?s)q_proj: lora_A \(2, 32\).*"
                     "different base model"):
    lorajax.peft.load(directory, params)
  bad = dict(tensors)
  bad[q + ".lora_B.weight"] = np.zeros((64, 3), np.float32)
  save_file(bad, wpath)
  with pytest.raises(ValueError, match=r"q_proj: lora_A \(2, 64\) and lora_B"
                     r" \(64, 3\) are not an \(r, in\), \(out, r\) pair"):
    lorajax.peft.load(directory, params)
  bad = dict(tensors)
  bad["base_model.model.model.embed_tokens.lora_embedding_A"] = np.zeros(
      (2, 256), np.float32)
  save_file(bad, wpath)
  with pytest.raises(ValueError, match="lora_embedding_A"):
    lorajax.peft.load(directory, params)
  save_file({}, wpath)
  with pytest.raises(ValueError, match="holds no LoRA tensors"):
    lorajax.peft.load(directory, params)
  os.remove(wpath)
  (open(os.path.join(directory, "adapter_model.bin"), "wb")).close()
  with pytest.raises(ValueError, match=r"adapter_model.bin, a pickle"):
    lorajax.peft.load(directory, params)
  os.remove(os.path.join(directory, "adapter_config.json"))
  with pytest.raises(ValueError, match=r"has no adapter_config.json"):
    lorajax.peft.load(directory, params)


def test_load_rejects_non_2d_target(saved):
  directory, params = saved
  p3 = jax.tree.map(lambda x: x, params)
  q = p3["model"]["layers"]["0"]["self_attn"]["q_proj"]
  q["kernel"] = q["kernel"].reshape(64, 4, 16)
  with pytest.raises(ValueError, match=r"has shape \(64, 4, 16\); PEFT"):
    lorajax.peft.load(directory, p3)


def test_save_errors(base, tmp_path):
  _, _, params = base
  empty = jax.tree.map(lambda _: None, params)
  with pytest.raises(ValueError, match="no LoraWeight nodes"):
    lorajax.peft.save(tmp_path / "a", empty)
  stacked = {"layers": {"kernel": jnp.zeros((2, 8, 8))}}
  ad = lorajax.init(stacked, lorajax.LoraConfig(rank=2, axes={".*": "sio"}),
                    key=jax.random.key(0))
  # A stacked adapter whose path gives no per-layer module name.
  with pytest.raises(ValueError, match=r"stacked adapter.*no per-layer PEFT"
                     r" module name.*`name_map`.*\{\}"):
    lorajax.peft.save(tmp_path / "a", ad)
  experts = {"moe": {"kernel": jnp.zeros((8, 2, 8))}}
  ad = lorajax.init(experts, lorajax.LoraConfig(rank=2, axes={".*": "iso"}),
                    key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"axes 'iso'.*one leading stack"):
    lorajax.peft.save(tmp_path / "a", ad, name_map={"moe/kernel": "m{}"})
  odd = {"layer": {"proj": jnp.zeros((8, 8))}}
  ad = lorajax.init(odd, lorajax.LoraConfig(rank=2, targets="layer/proj"),
                    key=jax.random.key(0))
  with pytest.raises(ValueError, match="'layer/proj' has no PEFT module name"):
    lorajax.peft.save(tmp_path / "a", ad)
  with pytest.raises(ValueError, match="both map to PEFT module 'm'"):
    two = {"x": {"kernel": jnp.zeros((8, 8))},
           "y": {"kernel": jnp.zeros((8, 8))}}
    ad2 = lorajax.init(two, lorajax.LoraConfig(rank=2, targets=".*"),
                       key=jax.random.key(0))
    lorajax.peft.save(tmp_path / "a", ad2, name_map=lambda p: "m")
  with pytest.raises(ValueError, match="`name_map` gives no PEFT module name"
                     " for the adapted weight 'layer/proj'"):
    lorajax.peft.save(tmp_path / "a", ad, name_map={"other": "x"})
  with pytest.raises(TypeError, match="`name_map` returned 3"):
    lorajax.peft.save(tmp_path / "a", ad, name_map=lambda p: 3)
  with pytest.raises(TypeError, match="`name_map` must be None, a dict"):
    lorajax.peft.save(tmp_path / "a", ad, name_map=42)
  assert not os.path.exists(tmp_path / "a")
