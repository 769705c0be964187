"""Shared helpers for the model tests: tiny random transformers Llamas."""

import numpy as np
import torch
import transformers

TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
)


def tiny_torch_llama(tie: bool = False, seed: int = 0, **overrides):
  """A random LlamaForCausalLM with non-trivial weights and norms."""
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      **{**TINY, **overrides}, tie_word_embeddings=tie,
      initializer_range=0.1, attn_implementation="eager",
  )
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  return model


def torch_logits(model, ids, mask=None, position_ids=None) -> np.ndarray:
  with torch.no_grad():
    kw = {}
    if mask is not None:
      kw["attention_mask"] = torch.as_tensor(np.array(mask))
    if position_ids is not None:
      kw["position_ids"] = torch.as_tensor(np.array(position_ids))
    out = model(torch.as_tensor(np.array(ids)), **kw).logits
  return out.float().numpy()


def random_ids(rng: np.random.Generator, batch: int, seq: int, vocab=256):
  return rng.integers(3, vocab, size=(batch, seq)).astype(np.int64)
