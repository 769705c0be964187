"""A small wrapper over `tokenizers.Tokenizer`, with chat templates."""

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

# Pre-tokenizer regexes of llama.cpp's BPE `tokenizer.ggml.pre` types.
_GPT2_RE = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|"
    r"\s+"
)
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGIT_SPLIT_PRES = ("smollm", "starcoder", "refact", "codeshell")


def _chatml(messages: Sequence[Mapping[str, str]], add_generation_prompt):
  text = "".join(
      f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages
  )
  if add_generation_prompt:
    text += "<|im_start|>assistant\n"
  return text


def _token_str(tok: Any) -> str | None:
  if isinstance(tok, Mapping):
    return tok.get("content")
  return tok


class Tokenizer:
  """Text <-> token ids for a model, with its chat template.

  A thin wrapper over a `tokenizers.Tokenizer` (the Rust tokenizers library)
  built from a Hugging Face `tokenizer.json` or from the vocabulary embedded
  in a GGUF file.

  Attributes:
    tokenizer: The underlying `tokenizers.Tokenizer`.
    chat_template: The Jinja chat template string, or None.
    bos_id: Beginning-of-sequence id, or None.
    eos_id: End-of-sequence id, or None.
    pad_id: Padding id, or None.
  """

  def __init__(
      self,
      tokenizer: tokenizers.Tokenizer,
      *,
      chat_template: str | None = None,
      bos_id: int | None = None,
      eos_id: int | None = None,
      pad_id: int | None = None,
  ):
    self.tokenizer = tokenizer
    self.chat_template = chat_template
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = pad_id

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def _token(self, i: int | None) -> str:
    if i is None:
      return ""
    return self.tokenizer.id_to_token(i) or ""

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`.

    Args:
      text: The text. Special tokens written in it (`<|im_start|>`) are
        recognised.
      add_special_tokens: Apply the tokenizer's post-processor (e.g. prepend
        BOS for tokenizers that do).

    Returns:
      The token ids.
    """
    if not isinstance(text, str):
      raise TypeError(f"`text` must be a str; got {type(text).__name__}.")
    return self.tokenizer.encode(
        text, add_special_tokens=add_special_tokens
    ).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Text of token ids.

    Args:
      ids: Token ids (a list or a 1-D array).
      skip_special_tokens: Drop special tokens such as `<|im_end|>`.

    Returns:
      The decoded text.
    """
    ids = [int(i) for i in ids]
    return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(
      self,
      messages: Sequence[Mapping[str, str]],
      add_generation_prompt: bool = True,
  ) -> str:
    """Renders a conversation into the model's prompt text.

    The model's own chat template (from the GGUF metadata or
    tokenizer_config.json / chat_template.jinja) is rendered with jinja2 in a
    sandbox, as `transformers` does. If the model has no template, or jinja2 is
    not installed, the ChatML format that SmolLM2 and Qwen2 use is written
    instead: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, plus
    `<|im_start|>assistant\\n` when `add_generation_prompt`.

    Args:
      messages: Dicts with `role` and `content`.
      add_generation_prompt: End with the header of an assistant turn.

    Returns:
      The prompt text; encode it with `encode(text)` (the template already
      holds any special tokens).
    """
    for i, m in enumerate(messages):
      if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
        raise ValueError(
            f"`messages[{i}]` must be a dict with 'role' and 'content'; got"
            f" {m!r}."
        )
    if self.chat_template is None:
      return _chatml(messages, add_generation_prompt)
    try:
      import jinja2  # noqa: PLC0415
      from jinja2 import sandbox  # noqa: PLC0415
    except ImportError:
      return _chatml(messages, add_generation_prompt)

    def raise_exception(msg):
      raise ValueError(f"The chat template rejected the messages: {msg}")

    env = sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader()
    )
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
        x, ensure_ascii=False, indent=indent
    )
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(self.chat_template)
    return template.render(
        messages=[dict(m) for m in messages],
        add_generation_prompt=add_generation_prompt,
        bos_token=self._token(self.bos_id),
        eos_token=self._token(self.eos_id),
    )

  @classmethod
  def from_hf_dir(cls, path: str) -> "Tokenizer | None":
    """Reads tokenizer.json (+ tokenizer_config.json) from a directory."""
    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_path):
      return None
    tok = tokenizers.Tokenizer.from_file(tok_path)
    cfg: dict = {}
    cfg_path = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        cfg = json.load(f)
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
      named = {t.get("name"): t.get("template") for t in template}
      template = named.get("default", next(iter(named.values()), None))
    jinja_path = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.exists(jinja_path):
      with open(jinja_path) as f:
        template = f.read()

    def tid(name):
      s = _token_str(cfg.get(name))
      return None if s is None else tok.token_to_id(s)

    return cls(tok, chat_template=template, bos_id=tid("bos_token"),
               eos_id=tid("eos_token"), pad_id=tid("pad_token"))

  @classmethod
  def from_gguf_fields(cls, fields: Mapping[str, Any]) -> "Tokenizer | None":
    """Builds a BPE tokenizer from GGUF `tokenizer.ggml.*` metadata.

    Supports `tokenizer.ggml.model == "gpt2"` (byte-level BPE: GPT-2, SmolLM,
    Llama 3, Qwen2). Returns None for other tokenizer models (e.g.
    SentencePiece "llama"), whose tokenizer is then unavailable.

    Args:
      fields: GGUF metadata, key -> Python value.

    Returns:
      The tokenizer or None.
    """
    if fields.get("tokenizer.ggml.model") != "gpt2":
      return None
    tokens = list(fields["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False)
    )
    pre = fields.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=False
    )
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
      regex = _LLAMA3_RE
    elif pre in ("qwen2", "deepseek-r1-qwen"):
      regex = _QWEN2_RE
    else:  # GPT-2's pattern, used by "default", "gpt-2", SmolLM, StarCoder.
      regex = _GPT2_RE
    pieces: list[Any] = []
    if pre in _DIGIT_SPLIT_PRES:
      pieces.append(pre_tokenizers.Digits(individual_digits=True))
    pieces.append(
        pre_tokenizers.Split(
            tokenizers.Regex(regex), behavior="isolated", invert=False
        )
    )
    pieces.append(byte_level)
    tok.pre_tokenizer = pre_tokenizers.Sequence(pieces)
    tok.decoder = decoders.ByteLevel()
    types = fields.get("tokenizer.ggml.token_type")
    if types is not None:
      special = [
          tokenizers.AddedToken(tokens[i], special=True, normalized=False)
          for i, t in enumerate(types) if int(t) in (3, 4)  # control, user
      ]
      tok.add_special_tokens(special)
    bos = fields.get("tokenizer.ggml.bos_token_id")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    pad = fields.get("tokenizer.ggml.padding_token_id")
    if fields.get("tokenizer.ggml.add_bos_token") and bos is not None:
      tok.post_processor = processors.TemplateProcessing(
          single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
          special_tokens=[(tokens[bos], int(bos))],
      )
    else:
      tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return cls(
        tok,
        chat_template=fields.get("tokenizer.chat_template"),
        bos_id=None if bos is None else int(bos),
        eos_id=None if eos is None else int(eos),
        pad_id=None if pad is None else int(pad),
    )
