"""A Llama-family decoder (Llama, SmolLM, Qwen2) as pure functions of a dict.

Parameters are a plain nested dict whose paths follow the Hugging Face module
names, with `x @ W` kernels of shape `(in, out)` and one dict per layer under
string keys `"0"`, `"1"`, ...:

  model/embed_tokens/embedding                 (vocab, hidden)
  model/layers/<i>/input_layernorm/scale       (hidden,)
  model/layers/<i>/self_attn/{q,k,v,o}_proj/kernel   (+ optional `bias`)
  model/layers/<i>/post_attention_layernorm/scale
  model/layers/<i>/mlp/{gate,up,down}_proj/kernel
  model/norm/scale
  lm_head/kernel                               (hidden, vocab), absent if tied

With scanned layers (`LlamaConfig.scan_layers`, on by default for models
deeper than `SCAN_MIN_LAYERS - 1` layers) the per-layer dicts are replaced by
one dict of the same structure whose leaves are stacked along a new leading
layer axis, and the layers run under `jax.lax.scan` (compile time does not
grow with depth):

  model/layers/self_attn/q_proj/kernel         (layers, hidden, heads*hd)
  model/layers/input_layernorm/scale           (layers, hidden)
  ...

`forward` and `generate` run either layout; `stack_layers` and
`unstack_layers` convert between them. LoRA adapters of stacked kernels have
axes `"sio"` (one adapter per layer along the stack axis), which
`lorajax.LoraConfig` picks by default for this layout.
"""

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lorajax._src.core import factored
from lorajax._src.core import multi as multi_lib
from lorajax._src.core.adapter import LoraWeight
from lorajax._src.core.typing import PyTree

_SUPPORTED_TYPES = ("llama", "qwen2", "mistral")

SCAN_MIN_LAYERS = 5
"""`LlamaConfig(scan_layers=None)` scans models with at least this many layers.

Below it the unrolled loop compiles about as fast and keeps the per-layer
paths (`model/layers/0/...`) that small test models and tools index directly.
"""

REMAT_POLICIES = ("none", "full", "dots", "projections")
"""The values of `LlamaConfig.remat` (see its docstring)."""

PROJECTION_NAMES = ("llama_q", "llama_k", "llama_v", "llama_attn_out",
                    "llama_gate", "llama_up")
"""`checkpoint_name`s of the activations `remat="projections"` saves.

The query, key and value projections (before the rotary embedding), the
attention output (the input of `o_proj`) and the MLP's gate and up
projections, each including its LoRA term under `lorajax.lora`.
"""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyperparameters of a Llama-family decoder.

  Attributes:
    vocab_size: Number of token ids.
    hidden_size: Model width.
    intermediate_size: Width of the SwiGLU MLP.
    num_hidden_layers: Number of decoder layers.
    num_attention_heads: Number of query heads.
    num_key_value_heads: Number of key/value heads (grouped-query attention).
    head_dim: Width of one head (default `hidden_size // num_attention_heads`).
    rms_norm_eps: Epsilon of the RMS norms.
    rope_theta: Base of the rotary frequencies.
    rope_scaling: Optional Llama 3 style scaling, as a tuple of `(key, value)`
      pairs (`rope_type`, `factor`, `low_freq_factor`, `high_freq_factor`,
      `original_max_position_embeddings`); a dict is accepted and converted.
    max_position_embeddings: Longest supported sequence.
    tie_word_embeddings: Whether the output head reuses the embedding table.
    bos_token_id: Beginning-of-sequence id, or None.
    eos_token_id: End-of-sequence id (the first one if the checkpoint lists
      several), or None.
    eos_token_ids: All end-of-sequence ids when the checkpoint lists several
      (Llama 3 instruct models stop on any of them), else None. `generate`
      stops on any of them by default.
    pad_token_id: Padding id, or None.
    attention_bias: Whether `init_params` creates q/k/v (and for Llama, o)
      projection biases. `apply` uses any `bias` present in the params.
    model_type: `"llama"`, `"qwen2"` or `"mistral"` (Mistral without sliding
      windows).
    dtype: Computation dtype name (`"float32"` or `"bfloat16"`). Softmax,
      norms and the output head's accumulation run in float32; logits are
      returned in float32.
    scan_layers: Store the decoder layers stacked along a leading axis and
      run them with `jax.lax.scan` (True), or as one dict per layer run by a
      Python loop (False). None (the default) scans models with at least
      `SCAN_MIN_LAYERS` (5) layers; read the decision from `scanned`. It
      decides the layout `init_params` and `from_pretrained` produce;
      `forward` and `generate` run whichever layout the params have.
    remat: Rematerialisation of the decoder layer body under `jax.grad`:
      `"none"` saves every activation the backward pass needs; `"full"`
      (`jax.checkpoint` with nothing saveable) keeps only each layer's input
      and recomputes the layer in the backward pass; `"dots"` saves the
      outputs of the matmuls without batch dimensions (the projections,
      including LoRA's `x @ a`) and recomputes attention scores, norms and
      activations (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`);
      `"projections"` saves only the activations named in
      `PROJECTION_NAMES` (q, k, v, the attention output, gate and up, LoRA
      terms included) and recomputes norms, rotary embeddings, attention
      scores, the activation function and LoRA's thin `x @ a` products:
      fewer residuals than `"dots"` (no `o_proj`/`down_proj` outputs, no
      separate base and LoRA terms) and no recomputed large matmul. With
      scanned layers it is the fastest of the four on CPU (SmolLM2-135M, see
      docs/performance.md) and what `lorajax finetune` uses.
      Values and gradients are the same for all four.
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Any = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  eos_token_ids: tuple[int, ...] | None = None
  pad_token_id: int | None = None
  attention_bias: bool = False
  model_type: str = "llama"
  dtype: str = "float32"
  scan_layers: bool | None = None
  remat: str = "none"

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
    if self.scan_layers is not None and not isinstance(self.scan_layers,
                                                       bool):
      raise TypeError(
          f"`scan_layers` must be True, False or None (auto); got"
          f" {self.scan_layers!r}."
      )
    if self.remat not in REMAT_POLICIES:
      raise ValueError(
          f"`remat` must be one of {REMAT_POLICIES}; got {self.remat!r}."
      )
    if self.num_key_value_heads is None:
      set_("num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      set_("head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"`num_attention_heads` ({self.num_attention_heads}) must be a"
          f" multiple of `num_key_value_heads` ({self.num_key_value_heads})."
      )
    if self.head_dim % 2:
      raise ValueError(f"`head_dim` must be even; got {self.head_dim}.")
    if self.model_type not in _SUPPORTED_TYPES:
      raise ValueError(
          f"`model_type` {self.model_type!r} is not supported; expected one"
          f" of {_SUPPORTED_TYPES}."
      )
    if self.eos_token_ids is not None:
      ids = tuple(int(i) for i in self.eos_token_ids)
      set_("eos_token_ids", ids if len(ids) > 1 else None)
      if self.eos_token_id is None and ids:
        set_("eos_token_id", ids[0])
    if isinstance(self.rope_scaling, Mapping):
      set_("rope_scaling", tuple(sorted(self.rope_scaling.items())))
    if self.rope_scaling is not None:
      rs = dict(self.rope_scaling)
      kind = rs.get("rope_type", rs.get("type"))
      if kind not in ("llama3", "default"):
        raise ValueError(
            f"`rope_scaling` type {kind!r} is not supported; only 'llama3'"
            " (Llama 3.1 style) and 'default' are. Remove `rope_scaling` from"
            " config.json only if the checkpoint was trained without it."
        )
      if kind == "default":
        set_("rope_scaling", None)
    try:
      dt = jnp.dtype(self.dtype)
    except TypeError:
      raise TypeError(f"`dtype` is not a dtype: {self.dtype!r}.") from None
    if not jnp.issubdtype(dt, jnp.floating):
      raise ValueError(f"`dtype` must be floating point; got {dt}.")
    set_("dtype", dt.name)

  @property
  def scanned(self) -> bool:
    """Whether `init_params`/`from_pretrained` stack the layers for scan."""
    if self.scan_layers is None:
      return self.num_hidden_layers >= SCAN_MIN_LAYERS
    return self.scan_layers

  @classmethod
  def from_hf_dict(
      cls, d: Mapping[str, Any], *, dtype: Any = "float32",
      scan_layers: bool | None = None, remat: str = "none",
  ) -> "LlamaConfig":
    """Builds a config from a Hugging Face `config.json` dict.

    Args:
      d: The parsed `config.json`.
      dtype: Computation dtype.
      scan_layers: See `LlamaConfig.scan_layers`.
      remat: See `LlamaConfig.remat`.

    Returns:
      The config.

    Raises:
      ValueError: If the model type is not a supported Llama-family type.
    """
    model_type = d.get("model_type", "llama")
    if model_type not in _SUPPORTED_TYPES:
      raise ValueError(
          f"config.json has model_type {model_type!r}; lorajax.models.llama"
          f" supports {_SUPPORTED_TYPES}."
      )
    eos = d.get("eos_token_id")
    eos_ids = None
    if isinstance(eos, list | tuple):
      eos_ids = tuple(eos)
      eos = eos[0] if eos else None
    rope_theta = d.get("rope_theta")
    rope_scaling = d.get("rope_scaling")
    rope_params = d.get("rope_parameters")  # transformers >= 5
    if isinstance(rope_params, Mapping):
      if rope_theta is None:
        rope_theta = rope_params.get("rope_theta")
      if rope_scaling is None and rope_params.get("rope_type") not in (
          None, "default"):
        rope_scaling = {
            k: v for k, v in rope_params.items() if k != "rope_theta"
        }
    if model_type == "qwen2":
      attention_bias = True
    else:
      attention_bias = bool(d.get("attention_bias", False))
    return cls(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads"),
        head_dim=d.get("head_dim"),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=10000.0 if rope_theta is None else float(rope_theta),
        rope_scaling=rope_scaling,
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        eos_token_ids=eos_ids,
        pad_token_id=d.get("pad_token_id"),
        attention_bias=attention_bias,
        model_type=model_type,
        dtype=jnp.dtype(dtype).name,
        scan_layers=scan_layers,
        remat=remat,
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """Returns a Hugging Face `config.json` dict for this config."""
    archs = {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "mistral": "MistralForCausalLM",
    }
    d = {
        "architectures": [archs[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": (
            None if self.rope_scaling is None else dict(self.rope_scaling)
        ),
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": (
            list(self.eos_token_ids) if self.eos_token_ids
            else self.eos_token_id),
        "pad_token_id": self.pad_token_id,
        "torch_dtype": self.dtype,
    }
    if self.model_type == "llama":
      d["attention_bias"] = self.attention_bias
      d["mlp_bias"] = False
    return d


# ----------------------------------------------------------------------------
# Building blocks.


def _inv_freq(config: LlamaConfig) -> np.ndarray:
  """Rotary inverse frequencies, with Llama 3 scaling when configured."""
  d = config.head_dim
  assert d is not None  # Set by LlamaConfig.__post_init__.
  inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  if config.rope_scaling is not None:
    rs = dict(config.rope_scaling)
    factor = float(rs["factor"])
    low = float(rs.get("low_freq_factor", 1.0))
    high = float(rs.get("high_freq_factor", 4.0))
    old_len = float(rs.get("original_max_position_embeddings", 8192))
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def _rope_tables(config: LlamaConfig, positions: jax.Array):
  """`cos`, `sin` of shape (batch, seq, head_dim) in float32."""
  inv = jnp.asarray(_inv_freq(config))
  ang = positions.astype(jnp.float32)[..., None] * inv
  ang = jnp.concatenate([ang, ang], axis=-1)
  return jnp.cos(ang), jnp.sin(ang)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates `x` (batch, seq, heads, head_dim) in the Hugging Face layout."""
  half = x.shape[-1] // 2
  xf = x.astype(jnp.float32)
  rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  out = xf * cos[:, :, None, :] + rot * sin[:, :, None, :]
  return out.astype(x.dtype)


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * xf.astype(x.dtype)


def _linear(p: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
  y = x @ p["kernel"].astype(x.dtype)
  if "bias" in p:
    y = y + p["bias"].astype(x.dtype)
  return y


def _attention(q, k, v, mask, dtype):
  """Grouped-query attention.

  Args:
    q: (batch, s, heads, d).
    k: (batch, t, kv_heads, d).
    v: (batch, t, kv_heads, d).
    mask: Boolean (batch, s, t), True where attending is allowed.
    dtype: Output dtype.

  Returns:
    (batch, s, heads * d).
  """
  b, s, h, d = q.shape
  kvh = k.shape[2]
  q = q.reshape(b, s, kvh, h // kvh, d)
  scores = jnp.einsum(
      "bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32
  ) / math.sqrt(d)
  big_neg = jnp.finfo(jnp.float32).min
  scores = jnp.where(mask[:, None, None, :, :], scores, big_neg)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  out = jnp.einsum("bkgst,btkd->bskgd", probs, v.astype(dtype))
  return out.reshape(b, s, h * d)


def _saved(x: jax.Array, name: str) -> jax.Array:
  """Names `x` for `remat="projections"` (identity otherwise)."""
  return checkpoint_name(x, name)


def _constrain(x, sharding):
  return x if sharding is None else jax.lax.with_sharding_constraint(
      x, sharding)


def _qkv(p, config: LlamaConfig, x, cos, sin, act_sharding=None):
  """The normalised input's rotated queries, keys and values.

  Returns `(q, k, v)` of shapes `(batch, seq, heads, head_dim)` and
  `(batch, seq, kv_heads, head_dim)` (twice).
  """
  b, s, _ = x.shape
  attn = p["self_attn"]
  h = _rms_norm(x, p["input_layernorm"]["scale"], config.rms_norm_eps)
  h = _constrain(h, act_sharding)
  q = _saved(_linear(attn["q_proj"], h), "llama_q").reshape(
      b, s, config.num_attention_heads, config.head_dim)
  k = _saved(_linear(attn["k_proj"], h), "llama_k").reshape(
      b, s, config.num_key_value_heads, config.head_dim)
  v = _saved(_linear(attn["v_proj"], h), "llama_v").reshape(
      b, s, config.num_key_value_heads, config.head_dim)
  return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v


def _finish_layer(p, config: LlamaConfig, x, o, act_sharding=None):
  """The attention output projection and the MLP, both residual."""
  x = x + _linear(p["self_attn"]["o_proj"], o)
  h = _rms_norm(x, p["post_attention_layernorm"]["scale"], config.rms_norm_eps)
  h = _constrain(h, act_sharding)
  mlp = p["mlp"]
  g = _saved(_linear(mlp["gate_proj"], h), "llama_gate")
  u = _saved(_linear(mlp["up_proj"], h), "llama_up")
  return x + _linear(mlp["down_proj"], jax.nn.silu(g) * u)


def _layer(p, config: LlamaConfig, x, cos, sin, mask, act_sharding=None):
  """One decoder layer. Returns `(x, (k, v))`."""
  q, k, v = _qkv(p, config, x, cos, sin, act_sharding)
  o = _saved(_attention(q, k, v, mask, x.dtype), "llama_attn_out")
  return _finish_layer(p, config, x, o, act_sharding), (k, v)


def _embed(params, input_ids, dtype):
  table = params["model"]["embed_tokens"]
  table = table["embedding"] if "embedding" in table else table["weight"]
  return jnp.take(table, input_ids, axis=0).astype(dtype)


def _logits(params, config: LlamaConfig, x):
  x = _rms_norm(x, params["model"]["norm"]["scale"], config.rms_norm_eps)
  return _head(params, x)


def _head(params, x):
  """The output head on normalised hidden states `(..., hidden)`."""
  # The head accumulates in float32 (`preferred_element_type`): with a
  # bfloat16 model the logits, softmax and loss are float32, not rounded
  # bfloat16 values.
  if "lm_head" in params:
    p = params["lm_head"]
    y = jnp.matmul(x, p["kernel"].astype(x.dtype),
                   preferred_element_type=jnp.float32)
    if "bias" in p:
      y = y + p["bias"].astype(jnp.float32)
    return y
  table = params["model"]["embed_tokens"]
  table = table["embedding"] if "embedding" in table else table["weight"]
  # Contract over the hidden axis directly: no transposed copy of the table.
  return jnp.einsum("...h,vh->...v", x, table.astype(x.dtype),
                    preferred_element_type=jnp.float32)


def is_stacked(params: PyTree) -> bool:
  """True when `params` holds scan-stacked layers (see the module doc)."""
  layers = params["model"]["layers"]
  return "self_attn" in layers or "mlp" in layers


def _layers(params):
  layers = params["model"]["layers"]
  if is_stacked(params):
    raise ValueError(
        "These params hold scan-stacked layers (`model/layers/self_attn/...`"
        " with a leading layer axis); convert them with `unstack_layers`"
        " first."
    )
  missing = [str(i) for i in range(len(layers)) if str(i) not in layers]
  if missing:
    raise ValueError(
        f"`model/layers` must hold layers '0'..'{len(layers) - 1}'; it has"
        f" keys {sorted(layers)!r}."
    )
  return [layers[str(i)] for i in range(len(layers))]


def num_layers(params: PyTree) -> int:
  """The number of decoder layers in `params` (either layout)."""
  layers = params["model"]["layers"]
  if is_stacked(params):
    return int(jax.tree.leaves(layers)[0].shape[0])
  return len(layers)


def _is_adapter_node(x: Any) -> bool:
  return x is None or isinstance(x, LoraWeight)


def _stack_leaves(*xs):
  x0 = xs[0]
  if x0 is None:
    if any(x is not None for x in xs):
      raise ValueError("some layers have an adapter for a weight, some not")
    return None
  if isinstance(x0, LoraWeight):
    key = lambda x: (x.alpha, x.axes, x.rank, x.rslora)  # noqa: E731
    if any(not isinstance(x, LoraWeight) or key(x) != key(x0) for x in xs):
      raise ValueError(
          "the layers' adapters of one weight differ in rank, alpha, rslora"
          " or axes")
    return LoraWeight(a=jnp.stack([x.a for x in xs]),
                      b=jnp.stack([x.b for x in xs]), alpha=x0.alpha,
                      axes="s" + x0.axes, rslora=x0.rslora)
  return jnp.stack(xs)


def _slice_leaf(x, i: int):
  if x is None:
    return None
  if isinstance(x, LoraWeight):
    return LoraWeight(a=x.a[i], b=x.b[i], alpha=x.alpha, axes=x.axes[1:],
                      rslora=x.rslora)
  return x[i]


def stack_layers(params: PyTree) -> PyTree:
  """Per-layer params (`model/layers/<i>/...`) to the scan-stacked layout.

  Works on adapter trees too: the per-layer `LoraWeight`s of one weight
  (same rank and scale) become one with a leading stack axis (`"io"` ->
  `"sio"`), so an adapter keeps following its params.

  Args:
    params: A params (or adapter) dict with one entry per layer (returned as
      is when it is already stacked).

  Returns:
    A new params dict whose `model/layers` leaves have a leading layer axis.

  Raises:
    ValueError: If the layers do not all have the same structure and shapes.
  """
  if is_stacked(params):
    return params
  per = _layers(params)
  try:
    stacked = jax.tree.map(_stack_leaves, *per, is_leaf=_is_adapter_node)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "Cannot stack the layers: they differ in structure or shape (every"
        f" layer needs the same weights, e.g. the same biases). ({e})"
    ) from None
  return {**params, "model": {**params["model"], "layers": stacked}}


def unstack_layers(params: PyTree) -> PyTree:
  """Scan-stacked params to one `model/layers/<i>/...` dict per layer.

  Works on adapter trees too (`"sio"` adapters become per-layer `"io"`).

  Args:
    params: A params (or adapter) dict (returned as is when its layers are
      not stacked).

  Returns:
    A new params dict with string keys `"0"`, `"1"`, ... under
    `model/layers`.
  """
  if not is_stacked(params):
    return params
  layers = params["model"]["layers"]
  n = num_layers(params)
  per = {str(i): jax.tree.map(lambda x, i=i: _slice_leaf(x, i), layers,
                              is_leaf=_is_adapter_node)
         for i in range(n)}
  return {**params, "model": {**params["model"], "layers": per}}


def _remat(fn, config: LlamaConfig, *, prevent_cse: bool):
  if config.remat == "none":
    return fn
  policy = None  # "full": nothing saveable.
  if config.remat == "dots":
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  elif config.remat == "projections":
    policy = jax.checkpoint_policies.save_only_these_names(*PROJECTION_NAMES)
  return jax.checkpoint(fn, policy=policy, prevent_cse=prevent_cse)


def _run_layers(params, config: LlamaConfig, x, cos, sin, mask,
                act_sharding=None):
  """All decoder layers (scanned or unrolled, as `params` are laid out)."""

  def body(p, x):
    return _layer(p, config, x, cos, sin, mask,
                  act_sharding=act_sharding)[0]

  if is_stacked(params):
    # `prevent_cse=False` is safe inside scan and lets XLA share work.
    body = _remat(body, config, prevent_cse=False)
    x, _ = jax.lax.scan(lambda x, p: (body(p, x), None), x,
                        params["model"]["layers"])
    return x
  body = _remat(body, config, prevent_cse=True)
  for p in _layers(params):
    x = body(p, x)
  return x


def _attention_cached(q, k, v, ck, cv, mask, cache_mask, dtype):
  """Attention of new tokens over a KV cache and over themselves.

  The cache is only read: keys and values are stored `(batch, kv_heads,
  total, d)`, the layout in which both products below are plain batched
  matmuls (no transposed copy of the cache per layer and token), and the new
  tokens' own keys and values are attended to separately, so the cache is
  not updated (copied) inside the layer; the caller writes the new entries
  once per step, in place. The softmax runs over the concatenation, so the
  result is that of one attention over cache and new tokens together.

  Args:
    q: (batch, s, heads, d) new queries.
    k: (batch, s, kv_heads, d) new keys.
    v: (batch, s, kv_heads, d) new values.
    ck: (batch, kv_heads, total, d) cached keys.
    cv: (batch, kv_heads, total, d) cached values.
    mask: Boolean (batch, s, s), True where a new query sees a new key.
    cache_mask: Boolean (batch, s, total), True where it sees a cache slot.
    dtype: Output dtype.

  Returns:
    (batch, s, heads * d).
  """
  b, s, h, d = q.shape
  kvh = k.shape[2]
  total = ck.shape[2]
  q = q.reshape(b, s, kvh, h // kvh, d)
  f32 = jnp.float32
  big_neg = jnp.finfo(f32).min
  sc = jnp.einsum("bskgd,bktd->bkgst", q, ck.astype(dtype),
                  preferred_element_type=f32) / math.sqrt(d)
  sn = jnp.einsum("bskgd,btkd->bkgst", q, k,
                  preferred_element_type=f32) / math.sqrt(d)
  sc = jnp.where(cache_mask[:, None, None, :, :], sc, big_neg)
  sn = jnp.where(mask[:, None, None, :, :], sn, big_neg)
  probs = jax.nn.softmax(jnp.concatenate([sc, sn], axis=-1), axis=-1)
  probs = probs.astype(dtype)
  out = (jnp.einsum("bkgst,bktd->bskgd", probs[..., :total], cv.astype(dtype))
         + jnp.einsum("bkgst,btkd->bskgd", probs[..., total:], v))
  return out.reshape(b, s, h * d)


def _run_layers_cached(params, config, x, cos, sin, mask, cache=None,
                       cache_mask=None):
  """Decoder layers that read a KV cache; returns `(x, new_kv)`.

  `cache` is `None` (the prompt: attention among the new tokens only) or a
  `(k, v)` pair of `(layers, batch, kv_heads, total, d)` arrays for stacked
  params, a list of per-layer `(batch, kv_heads, total, d)` pairs otherwise.
  `new_kv` holds the new tokens' keys and values in the same layout with
  `seq` in place of `total`, for the caller to write into the cache.
  """
  dt = x.dtype

  def layer(p, x, c):
    q, k, v = _qkv(p, config, x, cos, sin)
    if c is None:
      o = _attention(q, k, v, mask, dt)
    else:
      o = _attention_cached(q, k, v, *c, mask, cache_mask, dt)
    kv = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    return _finish_layer(p, config, x, o), kv

  if is_stacked(params):
    layers = params["model"]["layers"]
    if cache is None:
      return jax.lax.scan(lambda x, p: layer(p, x, None), x, layers)
    return jax.lax.scan(lambda x, pc: layer(pc[0], x, pc[1:]), x,
                        (layers, *cache))
  new_kv = []
  for i, p in enumerate(_layers(params)):
    x, kv = layer(p, x, None if cache is None else cache[i])
    new_kv.append(kv)
  return x, new_kv


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """Position ids that skip padding: `cumsum(mask) - 1`, clipped at 0."""
  m = attention_mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


def forward(
    params: PyTree,
    config: LlamaConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    *,
    activation_sharding: Any = None,
) -> jax.Array:
  """Logits `(batch, seq, vocab)` in float32 (see `LlamaModel.apply`).

  `activation_sharding` (a `jax.sharding.Sharding` for `(batch, seq,
  hidden)` activations, e.g. `NamedSharding(mesh, P(("data", "fsdp")))`)
  pins the normalised activations that enter each layer's projections, so
  that with FSDP-sharded weights the compiler all-gathers the weights
  instead of all-reducing activations. None leaves it to the compiler.
  """
  input_ids = jnp.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ValueError(
        f"`input_ids` must have shape (batch, seq); got {input_ids.shape}."
        " Add a batch axis with `input_ids[None]`."
    )
  b, s = input_ids.shape
  if attention_mask is not None:
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != (b, s):
      raise ValueError(
          f"`attention_mask` must have the shape of `input_ids` {(b, s)};"
          f" got {attention_mask.shape}."
      )
  return _logits(params, config, _trunk(
      params, config, input_ids, attention_mask, position_ids,
      activation_sharding=activation_sharding))


def _trunk(params, config: LlamaConfig, input_ids, attention_mask,
           position_ids, *, activation_sharding=None):
  """Embedding and decoder layers: `(batch, seq, hidden)` before the final
  norm. Inputs are checked by the callers."""
  b, s = input_ids.shape
  dtype = jnp.dtype(config.dtype)
  if attention_mask is None:
    key_valid = jnp.ones((b, s), bool)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(s), (b, s))
  else:
    key_valid = attention_mask.astype(bool)
    if position_ids is None:
      position_ids = positions_from_mask(attention_mask)
  causal = jnp.tril(jnp.ones((s, s), bool))
  mask = causal[None] & key_valid[:, None, :]
  cos, sin = _rope_tables(config, jnp.asarray(position_ids))
  x = _constrain(_embed(params, input_ids, dtype), activation_sharding)
  return _run_layers(params, config, x, cos, sin, mask,
                     act_sharding=activation_sharding)


LOSS_CHUNK = 128
"""Rows of the output head's narrowest matmul in `loss_sums` (see there)."""

LOSS_BLOCK_CHUNKS = 4
"""`loss_sums`' blocks hold this many times `chunk` positions."""


def _head_blocks(n: int, chunk: int) -> list[tuple[int, list[int]]]:
  """`(start, widths)` of `loss_sums`' blocks of positions.

  Blocks of `LOSS_BLOCK_CHUNKS * chunk` positions (the last one shorter);
  within a block the head runs on its first `width` rows for the smallest
  width that holds the block's loss positions: `chunk`, `2 * chunk`, ...
  up to the whole block. A completion-only loss runs one narrow matmul,
  a loss on every position one wide matmul per block (on CPU the head's
  matmuls are about 1.3x faster per row at 512 rows than at 128).
  """
  block = LOSS_BLOCK_CHUNKS * chunk
  out = []
  for start in range(0, n, block):
    size = min(block, n - start)
    widths, w = [], chunk
    while w < size:
      widths.append(w)
      w *= 2
    out.append((start, [*widths, size]))
  return out


def loss_sums(
    params: PyTree,
    config: LlamaConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    loss_mask: jax.Array,
    *,
    chunk: int = LOSS_CHUNK,
    activation_sharding: Any = None,
) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy, with the head run only where needed.

  The same value as computing `forward`'s logits and summing
  `(logsumexp(logits[t]) - logits[t, ids[t + 1]]) * loss_mask[t + 1]` over
  every row and position `t`, up to float32 reassociation, for the value
  and its gradients. Instead of the `(batch, seq, vocab)` logits (100 MB in
  float32 for 4 x 128 tokens of a 49k vocabulary), the positions that carry
  a loss (`loss_mask[t + 1] != 0`) are moved first, in order, and cut into
  blocks of `LOSS_BLOCK_CHUNKS * chunk` positions; in each block a
  `lax.switch` runs the output head and the cross-entropy on the block's
  first `chunk`, `2 * chunk`, ... rows or the whole block, the fewest that
  hold its loss positions, or skips a block that holds none. With a
  completion-only loss (prompts and padding carry no loss) the head's
  matmuls, by far the widest of a small model, run on about the completion
  tokens only; with a loss everywhere they run on whole blocks.

  Args:
    params: The params dict.
    config: The model config.
    input_ids: `(batch, seq)` int token ids.
    attention_mask: `(batch, seq)` 1/0 mask, or None (no padding).
    loss_mask: `(batch, seq)` weights: position `t` predicts token `t + 1`,
      which counts with weight `loss_mask[..., t + 1]`.
    chunk: Rows of the narrowest head matmul (>= 1).
    activation_sharding: See `forward`.

  Returns:
    `(summed weighted negative log-likelihood, summed weights)`, float32
    scalars.

  Raises:
    ValueError: If the shapes disagree or `chunk` < 1.
  """
  input_ids = jnp.asarray(input_ids)
  loss_mask = jnp.asarray(loss_mask)
  if input_ids.ndim != 2:
    raise ValueError(
        f"`input_ids` must have shape (batch, seq); got {input_ids.shape}.")
  if loss_mask.shape != input_ids.shape:
    raise ValueError(
        f"`loss_mask` must have the shape of `input_ids` {input_ids.shape};"
        f" got {loss_mask.shape}.")
  if attention_mask is not None:
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
      raise ValueError(
          f"`attention_mask` must have the shape of `input_ids`"
          f" {input_ids.shape}; got {attention_mask.shape}.")
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"`chunk` must be an integer >= 1; got {chunk!r}.")
  x = _trunk(params, config, input_ids, attention_mask, None,
             activation_sharding=activation_sharding)
  x = _rms_norm(x, params["model"]["norm"]["scale"], config.rms_norm_eps)
  b, s, h = x.shape
  n = b * (s - 1)
  w = loss_mask[:, 1:].reshape(n).astype(jnp.float32)
  if n == 0:
    return jnp.float32(0), jnp.sum(w)
  xs = x[:, :-1].reshape(n, h)
  targets = input_ids[:, 1:].reshape(n)
  # Positions with a loss first (a stable sort keeps their order).
  order = jnp.argsort((w == 0).astype(jnp.int32), stable=True)
  xs, targets, ws = xs[order], targets[order], w[order]
  count = jnp.sum((w != 0).astype(jnp.int32))

  def chunk_loss(xc, tc, wc):
    logits = _head(params, xc)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
    return jnp.sum((logz - picked) * wc)

  def skip(xc, tc, wc):
    del xc, tc, wc
    return jnp.float32(0)

  def first_rows(width):
    return lambda xc, tc, wc: chunk_loss(xc[:width], tc[:width], wc[:width])

  total = jnp.float32(0)
  for start, widths in _head_blocks(n, chunk):
    sl = slice(start, start + widths[-1])
    here = jnp.clip(count - start, 0, widths[-1])
    # 0: no loss position in the block; i > 0: the first widths[i - 1] rows.
    branch = jnp.where(here > 0, 1 + jnp.searchsorted(
        jnp.asarray(widths), here, side="left"), 0)
    total = total + jax.lax.switch(
        branch, [skip, *map(first_rows, widths)], xs[sl], targets[sl],
        ws[sl])
  return total, jnp.sum(w)


# ----------------------------------------------------------------------------
# Generation with a KV cache.

_PROMPT_BUCKET = 8
_SAMPLE_BLOCK = 256


def _first_reaching(w: jax.Array, u: jax.Array) -> jax.Array:
  """Per row, the first index where `cumsum(w)` reaches `u * sum(w)`.

  With `w >= 0` and `u` in (0, 1] the index has `w > 0`: it is a draw from
  the categorical distribution `w / sum(w)` given the uniform `u`.
  """
  c = jnp.cumsum(w, axis=-1)
  i = jnp.sum(c < u[:, None] * c[:, -1:], axis=-1)
  return jnp.minimum(i, w.shape[-1] - 1)


def _sample_categorical(key: jax.Array, logits: jax.Array,
                        temperature: float) -> jax.Array:
  """One token per row from `softmax(logits / temperature)`, int32.

  Inverse-CDF sampling in two levels: a block of `_SAMPLE_BLOCK` tokens by
  its probability mass, then a token within that block, from two uniforms
  per row. `jax.random.categorical` (Gumbel-max) draws one random number per
  vocabulary entry instead: at batch 32 over SmolLM2's 49,152 tokens that
  cost about 50 ms per decoded token on one CPU core, more than the output
  head's matmul; this costs about 2 ms. The distribution is the same (the
  draws for a given key differ).
  """
  b, v = logits.shape
  z = logits.astype(jnp.float32) / temperature
  p = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))
  blocks = -(-v // _SAMPLE_BLOCK)
  p = jnp.pad(p, ((0, 0), (0, blocks * _SAMPLE_BLOCK - v)))
  p = p.reshape(b, blocks, _SAMPLE_BLOCK)
  u = 1.0 - jax.random.uniform(key, (2, b))  # In (0, 1]: never a 0-mass pick.
  i = _first_reaching(jnp.sum(p, axis=-1), u[0])
  row = jnp.take_along_axis(p, i[:, None, None], axis=1)[:, 0]
  return (i * _SAMPLE_BLOCK + _first_reaching(row, u[1])).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("config", "max_new_tokens", "temperature")
)
def _generate(params, config, input_ids, attention_mask, key, eos_ids, pad_id,
              adapter=None, *, max_new_tokens, temperature):
  b, p_len = input_ids.shape
  total = p_len + max_new_tokens
  dtype = jnp.dtype(config.dtype)
  stacked = is_stacked(params)
  key_valid = jnp.concatenate(
      [attention_mask.astype(bool), jnp.ones((b, max_new_tokens), bool)],
      axis=1)
  positions = positions_from_mask(attention_mask)
  n_valid = jnp.sum(attention_mask.astype(jnp.int32), axis=1)

  def pick(logits, key):
    if temperature == 0.0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return _sample_categorical(key, logits, temperature)

  def run(f, *args):
    # Unmerged adapters (one adapter, or an adapter set bound to
    # per-example ids) run factored; their arrays are traced, so new
    # adapter weights or ids reuse the compiled program.
    if adapter is None:
      return f(params, *args)
    return factored.lora(f)(params, adapter, *args)

  def prefill(params, input_ids, cos, sin, mask):
    x = _embed(params, input_ids, dtype)
    x, kv = _run_layers_cached(params, config, x, cos, sin, mask)
    return _logits(params, config, x[:, -1:])[:, 0], kv

  def step(params, tok, cos, sin, mask, cache, cache_mask):
    x = _embed(params, tok[:, None], dtype)
    x, kv = _run_layers_cached(params, config, x, cos, sin, mask, cache,
                               cache_mask)
    return _logits(params, config, x)[:, 0], kv

  # The cache: (layers,) batch, kv_heads, total, head_dim; the prompt fills
  # slots [0, p_len), generated token t goes to slot p_len + t.
  def to_cache(kv):
    pad = [(0, 0)] * (kv.ndim - 2) + [(0, max_new_tokens), (0, 0)]
    return jnp.pad(kv.astype(dtype), pad)

  def write(cache, kv, slot):
    def put(c, new):
      start = (0,) * (c.ndim - 2) + (slot, 0)
      return jax.lax.dynamic_update_slice(c, new.astype(c.dtype), start)
    return jax.tree.map(put, cache, kv)

  # Prefill: the whole prompt, attending among itself.
  cos, sin = _rope_tables(config, positions)
  causal = jnp.tril(jnp.ones((p_len, p_len), bool))
  mask = causal[None] & key_valid[:, None, :p_len]
  logits, kv = run(prefill, input_ids, cos, sin, mask)
  cache = jax.tree.map(to_cache, kv)
  if not stacked:
    cache = [tuple(c) for c in cache]
  key, sub = jax.random.split(key)
  tok = pick(logits, sub)
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
  is_eos = lambda t: jnp.any(t[:, None] == eos_ids[None, :], axis=1)  # noqa
  done = is_eos(tok)
  self_mask = jnp.ones((b, 1, 1), bool)

  def cond(carry):
    t, _, _, done, _, _ = carry
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    t, tok, cache, done, out, key = carry
    slot = p_len + t - 1
    pos = (n_valid + t - 1)[:, None]
    cos, sin = _rope_tables(config, pos)
    cache_mask = ((jnp.arange(total) < slot)[None, None, :]
                  & key_valid[:, None, :])
    logits, kv = run(step, tok, cos, sin, self_mask, cache, cache_mask)
    cache = write(cache, kv if stacked else [tuple(c) for c in kv], slot)
    key, sub = jax.random.split(key)
    nxt = pick(logits, sub)
    nxt = jnp.where(done, pad_id, nxt)
    out = out.at[:, t].set(nxt)
    done = done | is_eos(nxt)
    return t + 1, nxt, cache, done, out, key

  carry = (jnp.int32(1), tok, cache, done, out, key)
  _, _, _, _, out, _ = jax.lax.while_loop(cond, body, carry)
  return out


def generate(
    params: PyTree,
    config: LlamaConfig,
    input_ids: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    key: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int | None = None,
    adapter: PyTree | None = None,
    adapter_ids: jax.Array | None = None,
) -> jax.Array:
  """Decodes with a KV cache (see `LlamaModel.generate`).

  `adapter` runs unmerged (factored): an adapter tree, or with
  `adapter_ids` (one int per example, `lorajax.multi.BASE_ID` for the base
  model) an adapter set (`lorajax.multi.AdapterSet` or its `weights`), each
  example decoding with its own adapter. New ids or adapter weights of the
  same shapes reuse the compiled program.
  """
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if adapter_ids is not None:
    if adapter is None:
      raise ValueError("`adapter_ids` needs `adapter` (an adapter set).")
    adapter_ids = jnp.asarray(adapter_ids)
    if adapter_ids.shape != input_ids.shape[:1]:
      raise ValueError(
          f"`adapter_ids` must have one id per example, shape"
          f" {input_ids.shape[:1]}; got {adapter_ids.shape}.")
    adapter = multi_lib.bind(adapter, adapter_ids)
  if input_ids.ndim == 1:
    raise ValueError(
        f"`input_ids` must have shape (batch, seq); got {input_ids.shape}."
        " Add a batch axis with `input_ids[None]`."
    )
  if input_ids.ndim != 2 or input_ids.shape[1] == 0:
    raise ValueError(
        "`input_ids` must have shape (batch, seq) with seq >= 1; got"
        f" {input_ids.shape}."
    )
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
    raise TypeError(f"`max_new_tokens` must be an int; got {max_new_tokens!r}.")
  if max_new_tokens < 1:
    raise ValueError(f"`max_new_tokens` must be >= 1; got {max_new_tokens}.")
  temperature = float(temperature)
  if temperature < 0:
    raise ValueError(f"`temperature` must be >= 0; got {temperature}.")
  if temperature > 0 and key is None:
    raise ValueError(
        "Sampling with `temperature` > 0 needs a PRNG key: pass"
        " `key=jax.random.key(0)`, or use temperature=0.0 for greedy decoding."
    )
  if key is None:
    key = jax.random.key(0)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  else:
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if attention_mask.shape != input_ids.shape:
      raise ValueError(
          f"`attention_mask` must have the shape of `input_ids`"
          f" {input_ids.shape}; got {attention_mask.shape}."
      )
    if not isinstance(attention_mask, jax.core.Tracer):
      m = np.asarray(attention_mask)
      if np.any(m[:, 1:] < m[:, :-1]):
        raise ValueError(
            "`generate` needs left-padded prompts (padding first, then the"
            " tokens); `attention_mask` has a 0 after a 1. Pad on the left,"
            " e.g. set the tokenizer's padding side to 'left'."
        )
  if eos_id is None:
    eos_id = config.eos_token_ids or config.eos_token_id
  eos_ids: tuple[int, ...]
  if eos_id is None:
    eos_ids = (-1,)
  elif isinstance(eos_id, int | np.integer):
    eos_ids = (int(eos_id),)
  else:
    eos_ids = tuple(int(i) for i in eos_id) or (-1,)
  if pad_id is None:
    pad_id = (config.pad_token_id if config.pad_token_id is not None
              else eos_ids[0])
  pad_id = max(int(pad_id), 0)
  # Left-pad the prompt to a multiple of `_PROMPT_BUCKET` (masked), so prompts
  # of similar length share one compilation; the result is unchanged. (A
  # small multiple: the padding is computed too, and at batch 32 a 38-token
  # prompt padded to 64 made the prefill cost more than 32 decoded tokens.)
  p_len = input_ids.shape[1]
  pad = -p_len % _PROMPT_BUCKET
  if pad:
    input_ids = jnp.pad(input_ids, ((0, 0), (pad, 0)), constant_values=pad_id)
    attention_mask = jnp.pad(attention_mask, ((0, 0), (pad, 0)))
  return _generate(
      params, config, input_ids, attention_mask, key,
      jnp.asarray(eos_ids, jnp.int32),
      jnp.int32(pad_id), adapter, max_new_tokens=max_new_tokens,
      temperature=temperature,
  )


# ----------------------------------------------------------------------------
# Random parameters.


def init_params(
    config: LlamaConfig, *, key: jax.Array, dtype: Any = jnp.float32,
    std: float = 0.02,
) -> PyTree:
  """Random parameters for `config` (normal with `std`, norms around 1).

  The values do not depend on the layout: with `config.scanned` the result
  is `stack_layers` of the unrolled params for the same key.

  Args:
    config: The model config.
    key: PRNG key.
    dtype: Storage dtype of the parameters.
    std: Standard deviation of the weights.

  Returns:
    The nested params dict (see the module docstring for its paths), with
    scan-stacked layers when `config.scanned`.
  """
  keys = iter(jax.random.split(key, 16 * config.num_hidden_layers + 8))

  def w(*shape):
    return (std * jax.random.normal(next(keys), shape)).astype(dtype)

  def norm():
    return (1.0 + 0.1 * jax.random.normal(
        next(keys), (config.hidden_size,))).astype(dtype)

  hid, hd = config.hidden_size, config.head_dim
  assert hd is not None and config.num_key_value_heads is not None
  nq, nkv = config.num_attention_heads * hd, config.num_key_value_heads * hd
  layers = {}
  for i in range(config.num_hidden_layers):
    attn = {
        "q_proj": {"kernel": w(hid, nq)},
        "k_proj": {"kernel": w(hid, nkv)},
        "v_proj": {"kernel": w(hid, nkv)},
        "o_proj": {"kernel": w(nq, hid)},
    }
    if config.attention_bias:
      attn["q_proj"]["bias"] = w(nq)
      attn["k_proj"]["bias"] = w(nkv)
      attn["v_proj"]["bias"] = w(nkv)
      if config.model_type != "qwen2":
        attn["o_proj"]["bias"] = w(hid)
    layers[str(i)] = {
        "input_layernorm": {"scale": norm()},
        "self_attn": attn,
        "post_attention_layernorm": {"scale": norm()},
        "mlp": {
            "gate_proj": {"kernel": w(hid, config.intermediate_size)},
            "up_proj": {"kernel": w(hid, config.intermediate_size)},
            "down_proj": {"kernel": w(config.intermediate_size, hid)},
        },
    }
  params = {
      "model": {
          "embed_tokens": {"embedding": w(config.vocab_size, hid)},
          "layers": layers,
          "norm": {"scale": norm()},
      }
  }
  if not config.tie_word_embeddings:
    params["lm_head"] = {"kernel": w(hid, config.vocab_size)}
  return stack_layers(params) if config.scanned else params
