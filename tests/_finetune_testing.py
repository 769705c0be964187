"""Helpers for the fine-tuning tests: a tiny random Llama directory."""

import json
import pathlib

import jax
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from lorajax.models import llama

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> tokenizers.Tokenizer:
  """A byte-level BPE without merges: every byte is one token.

  Ids 0-2 are the special tokens (pad/eos/bos style), bytes follow.
  """
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {s: i for i, s in enumerate(SPECIALS)}
  for ch in sorted(alphabet):
    vocab[ch] = len(vocab)
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(list(SPECIALS))
  return tok


def write_tiny_model(directory: pathlib.Path, *, seed: int = 0,
                     max_positions: int = 256) -> pathlib.Path:
  """Saves a tiny random Llama with a byte tokenizer and a ChatML template."""
  tok = byte_tokenizer()
  config = llama.LlamaConfig(
      vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=max_positions, tie_word_embeddings=True,
      bos_token_id=1, eos_token_id=2, pad_token_id=0,
  )
  params = llama.init_params(config, key=jax.random.key(seed), std=0.1)
  llama.save_pretrained(directory, config, params)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps({
      "chat_template": CHATML, "bos_token": "<|im_start|>",
      "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
  }))
  return directory


def write_reverse_data(path: pathlib.Path, n: int, *, seed: int = 0) -> None:
  """Tiny word-reversal data: 2-3 letters, reversed."""
  import random

  rng = random.Random(seed)
  with path.open("w") as f:
    for _ in range(n):
      w = rng.sample("abcdefgh", rng.randint(2, 3))
      f.write(json.dumps({"prompt": " ".join(w),
                          "completion": " ".join(reversed(w))}) + "\n")
