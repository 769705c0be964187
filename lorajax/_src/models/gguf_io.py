"""GGUF (llama.cpp) checkpoints: metadata, dequantization, q/k unpermuting."""

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lorajax._src.core import quant as quant_lib
from lorajax._src.models import llama as llama_lib
from lorajax._src.models.llama import LlamaConfig

# ggml type ids (ggml.h): stable across gguf versions.
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
_TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1",
               Q8_0: "Q8_0", BF16: "BF16"}
_BLOCK = 32
# Bytes per block of 32 values.
_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}

_SUPPORTED_ARCHS = ("llama", "qwen2")
_BLK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_BLK_NAMES = {
    "attn_q": ("self_attn", "q_proj"),
    "attn_k": ("self_attn", "k_proj"),
    "attn_v": ("self_attn", "v_proj"),
    "attn_output": ("self_attn", "o_proj"),
    "ffn_gate": ("mlp", "gate_proj"),
    "ffn_up": ("mlp", "up_proj"),
    "ffn_down": ("mlp", "down_proj"),
}
_BLK_NORMS = {"attn_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm"}


def _nibbles(qs: np.ndarray) -> np.ndarray:
  """(blocks, 16) packed bytes -> (blocks, 32) values 0..15, ggml order."""
  return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...],
               name: str = "tensor") -> np.ndarray:
  """Dequantizes GGUF tensor data to float32.

  Args:
    raw: The tensor's data as stored: a float array for F32/F16, or bytes
      (uint8, any shape) for BF16 and block-quantized types.
    ggml_type: The ggml type id (0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0,
      30 BF16).
    shape: The numpy shape of the result (ggml's `ne` reversed).
    name: Tensor name for error messages.

  Returns:
    A float32 array of `shape`.

  Raises:
    ValueError: For an unsupported type or data of the wrong size.
  """
  n = int(np.prod(shape))
  if ggml_type == F32:
    return np.asarray(raw).view(np.float32).reshape(shape)
  if ggml_type == F16:
    return np.asarray(raw).view(np.float16).astype(np.float32).reshape(shape)
  if ggml_type == BF16:
    bits = np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32).reshape(shape)
  if ggml_type not in _BLOCK_BYTES:
    raise ValueError(
        f"GGUF tensor {name!r} has ggml type {ggml_type}, which lorajax does"
        " not dequantize; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1."
        " Re-quantize the file with llama.cpp's llama-quantize to one of them."
    )
  nbytes = _BLOCK_BYTES[ggml_type]
  data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
  if n % _BLOCK or data.size != n // _BLOCK * nbytes:
    raise ValueError(
        f"GGUF tensor {name!r} ({_TYPE_NAMES[ggml_type]}, shape {shape}) has"
        f" {data.size} bytes; expected {n // _BLOCK * nbytes}. The file is"
        " truncated or corrupt."
    )
  blocks = data.reshape(-1, nbytes)
  d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
  if ggml_type == Q8_0:
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    out = d * q
  elif ggml_type == Q4_0:
    out = d * (_nibbles(blocks[:, 2:]) - 8.0)
  else:  # Q4_1
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    out = d * _nibbles(blocks[:, 4:]) + m
  return out.reshape(shape)


def quantized_blocks(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...],
                     *, dtype: Any, transpose: bool, heads: int | None = None,
                     name: str = "tensor") -> quant_lib.QuantizedWeight:
  """A GGUF Q4_0/Q4_1/Q8_0 matrix as a `QuantizedWeight`, blocks unchanged.

  The file's codes, `d` and `m` are kept bit for bit; only their layout
  follows the params: a kernel (`transpose=True`) is stored `(in, out)` with
  blocks along axis -2, a table `(rows, in)` with blocks along axis -1.

  Args:
    raw: The tensor's bytes as stored.
    ggml_type: Q4_0 (2), Q4_1 (3) or Q8_0 (8).
    shape: The numpy shape `(out, in)` (ggml's `ne` reversed).
    dtype: The dense (compute) dtype the weight stands for.
    transpose: Store it as an `x @ W` kernel `(in, out)`.
    heads: Undo llama.cpp's rotary row permutation for this many heads.
    name: Tensor name for error messages.

  Returns:
    The quantized weight.

  Raises:
    ValueError: For another type, a shape that is not 2-D, or data of the
      wrong size.
  """
  if ggml_type not in _BLOCK_BYTES or len(shape) != 2:
    raise ValueError(
        f"GGUF tensor {name!r} ({_TYPE_NAMES.get(ggml_type, ggml_type)},"
        f" shape {shape}) cannot be kept quantized: only 2-D Q4_0, Q4_1 and"
        " Q8_0 tensors can. Load with `quantized=False`.")
  rows, cols = shape
  nbytes = _BLOCK_BYTES[ggml_type]
  data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
  if cols % _BLOCK or data.size != rows * cols // _BLOCK * nbytes:
    raise ValueError(
        f"GGUF tensor {name!r} ({_TYPE_NAMES[ggml_type]}, shape {shape}) has"
        f" {data.size} bytes; expected {rows * cols // _BLOCK * nbytes}. The"
        " file is truncated or corrupt.")
  blocks = data.reshape(rows, cols // _BLOCK, nbytes)
  d: np.ndarray = blocks[..., :2].copy().view(np.float16)[..., 0]
  mins: np.ndarray | None = None
  codes: np.ndarray
  if ggml_type == Q8_0:
    codes = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
    fmt = "q8_0"
  elif ggml_type == Q4_0:
    codes = blocks[..., 2:].reshape(rows, cols // 2).copy()
    fmt = "q4_0"
  else:
    mins = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    codes = blocks[..., 4:].reshape(rows, cols // 2).copy()
    fmt = "q4_1"
  parts: list[np.ndarray] = [codes, d] + ([mins] if mins is not None
                                          else [])
  if heads is not None:
    parts = [unpermute_rotary(x, heads) for x in parts]
  if transpose:
    parts = [np.ascontiguousarray(x.T) for x in parts]
  codes, d = parts[0], parts[1]
  mins = parts[2] if len(parts) > 2 else None
  return quant_lib.QuantizedWeight(
      jnp.asarray(codes), jnp.asarray(d),
      None if mins is None else jnp.asarray(mins), format=fmt, block=_BLOCK,
      axis=-2 if transpose else -1, dtype=jnp.dtype(dtype))


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's rotary row permutation of a q or k projection.

  llama.cpp's converter reorders the output rows of each head from the Hugging
  Face layout (first half, second half of the rotary pairs) to interleaved
  pairs. This is the inverse; `w` has output rows first ((out, in) or (out,)).

  Args:
    w: The weight (out, in) or bias (out,) as stored in the GGUF.
    n_heads: Number of heads of this projection.

  Returns:
    The weight in the Hugging Face layout.
  """
  out = w.shape[0]
  head_dim = out // n_heads
  rest = w.shape[1:]
  return (w.reshape(n_heads, head_dim // 2, 2, *rest)
          .swapaxes(1, 2).reshape(w.shape))


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's permutation (the inverse of `unpermute_rotary`)."""
  out = w.shape[0]
  head_dim = out // n_heads
  rest = w.shape[1:]
  return (w.reshape(n_heads, 2, head_dim // 2, *rest)
          .swapaxes(1, 2).reshape(w.shape))


class _GGUFTensor:
  """One tensor of a GGUF file: name, ggml type, numpy shape and raw data."""

  def __init__(self, name: str, ggml_type: int, shape: tuple[int, ...],
               data: np.ndarray):
    self.name = name
    self.tensor_type = ggml_type
    self.shape = shape
    self.data = data


_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4",
            6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}


def read_gguf(path: str) -> tuple[dict[str, Any], list[_GGUFTensor]]:
  """Parses a GGUF (v2/v3, little-endian) file: `(metadata, tensors)`.

  The `gguf` package's `GGUFReader` builds a numpy view per string, which
  takes seconds for a 49k-token vocabulary; this parser reads the metadata
  with `struct` and memory-maps the tensor data. Tensor byte sizes come from
  `gguf.GGML_QUANT_SIZES`.

  Args:
    path: The .gguf file.

  Returns:
    The metadata (key -> Python value; arrays as lists or numpy arrays) and
    the tensors, whose `data` are read-only memory-mapped bytes (or float
    arrays for F32/F16) in file order.

  Raises:
    ValueError: If the file is not a GGUF v2/v3 file or is truncated.
  """
  import struct  # noqa: PLC0415

  import gguf  # noqa: PLC0415

  mm = np.memmap(path, dtype=np.uint8, mode="r")
  buf = mm.data
  pos = 0

  def take(fmt):
    nonlocal pos
    vals = struct.unpack_from(fmt, buf, pos)
    pos += struct.calcsize(fmt)
    return vals[0] if len(vals) == 1 else vals

  def string():
    nonlocal pos
    n = take("<Q")
    s = bytes(buf[pos:pos + n]).decode("utf-8", errors="replace")
    pos += n
    return s

  def value(vtype):
    nonlocal pos
    if vtype == 8:
      return string()
    if vtype == 9:
      etype, count = take("<IQ")
      if etype == 8:
        return [string() for _ in range(count)]
      if etype == 9:
        return [value(9) for _ in range(count)]
      dt = np.dtype(_SCALARS[etype])
      arr = np.frombuffer(buf, dtype=dt, count=count, offset=pos).copy()
      pos += dt.itemsize * count
      return arr
    if vtype not in _SCALARS:
      raise ValueError(f"{path!r}: unknown GGUF value type {vtype}.")
    v = np.frombuffer(buf, dtype=_SCALARS[vtype], count=1, offset=pos)[0]
    pos += np.dtype(_SCALARS[vtype]).itemsize
    return bool(v) if vtype == 7 else v.item()

  try:
    magic, version = take("<4sI")
    if magic != b"GGUF" or version not in (2, 3):
      raise ValueError(
          f"{path!r} is not a GGUF v2/v3 file (magic {magic!r}, version"
          f" {version}). Convert it with a current llama.cpp."
      )
    n_tensors, n_kv = take("<QQ")
    fields: dict[str, Any] = {}
    for _ in range(n_kv):
      key = string()
      fields[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
      name = string()
      n_dims = take("<I")
      dims = struct.unpack_from(f"<{n_dims}Q", buf, pos)
      pos += 8 * n_dims
      ggml_type, offset = take("<IQ")
      infos.append((name, tuple(reversed(dims)), ggml_type, offset))
  except struct.error as e:
    raise ValueError(
        f"{path!r} is truncated: its GGUF header is cut off.") from e
  align = int(fields.get("general.alignment", 32))
  start = (pos + align - 1) // align * align
  tensors = []
  for name, shape, ggml_type, offset in infos:
    try:
      block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(
          ggml_type)]
    except (ValueError, KeyError):
      raise ValueError(
          f"{path!r}: tensor {name!r} has unknown ggml type {ggml_type}."
      ) from None
    size = int(np.prod(shape)) // block * nbytes
    lo = start + offset
    if lo + size > mm.size:
      raise ValueError(
          f"{path!r} is truncated: tensor {name!r} ends at byte {lo + size}"
          f" but the file has {mm.size} bytes."
      )
    data = mm[lo:lo + size]
    if ggml_type == F32:
      data = data.view(np.float32).reshape(shape)
    elif ggml_type == F16:
      data = data.view(np.float16).reshape(shape)
    tensors.append(_GGUFTensor(name, ggml_type, shape, data))
  return fields, tensors


def read_config(fields: Mapping[str, Any], tensor_names: set[str], path: str,
                *, dtype: Any) -> LlamaConfig:
  arch = fields.get("general.architecture")
  if arch not in _SUPPORTED_ARCHS:
    raise ValueError(
        f"{path!r} is a GGUF of architecture {arch!r}; lorajax.models.llama"
        f" reads {_SUPPORTED_ARCHS}."
    )

  def get(key, default=None, required=False):
    full = f"{arch}.{key}"
    if full not in fields:
      if required:
        raise ValueError(f"{path!r} lacks the GGUF metadata key {full!r}.")
      return default
    return fields[full]

  scaling = get("rope.scaling.type")
  if (scaling not in (None, "none")) or "rope_freqs.weight" in tensor_names:
    raise ValueError(
        f"{path!r} uses rotary scaling ({scaling or 'rope_freqs tensor'}),"
        " which the GGUF loader does not support yet; load the Hugging Face"
        " checkpoint directory instead."
    )
  hidden = int(get("embedding_length", required=True))
  heads = int(get("attention.head_count", required=True))
  kv_heads = int(get("attention.head_count_kv", heads))
  head_dim = get("attention.key_length") or get("rope.dimension_count")
  head_dim = int(head_dim) if head_dim else hidden // heads
  tokens = fields.get("tokenizer.ggml.tokens")
  vocab = get("vocab_size") or (len(tokens) if tokens is not None else None)

  def opt_int(key):
    v = fields.get(key)
    return None if v is None else int(v)

  return LlamaConfig(
      vocab_size=int(vocab) if vocab else 0,
      hidden_size=hidden,
      intermediate_size=int(get("feed_forward_length", required=True)),
      num_hidden_layers=int(get("block_count", required=True)),
      num_attention_heads=heads,
      num_key_value_heads=kv_heads,
      head_dim=head_dim,
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
      rope_theta=float(get("rope.freq_base", 10000.0)),
      max_position_embeddings=int(get("context_length", 2048)),
      tie_word_embeddings="output.weight" not in tensor_names,
      bos_token_id=opt_int("tokenizer.ggml.bos_token_id"),
      eos_token_id=opt_int("tokenizer.ggml.eos_token_id"),
      pad_token_id=opt_int("tokenizer.ggml.padding_token_id"),
      attention_bias=arch == "qwen2",
      model_type=arch,
      dtype=jnp.dtype(dtype).name,
  )


def _set(tree: dict, path: list[str], value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def load_gguf(path: str, *, dtype: Any, scan_layers: bool | None = None,
              remat: str = "none", quantized: bool = False):
  """Reads a GGUF file: `(config, params, fields)`.

  Args:
    path: The .gguf file.
    dtype: Parameter and computation dtype.
    scan_layers: See `LlamaConfig.scan_layers`; stacked params when the
      resulting config is `scanned`.
    remat: See `LlamaConfig.remat`.
    quantized: Keep Q4_0/Q4_1/Q8_0 matrices in their blocks, as
      `QuantizedWeight` leaves (see `quantized_blocks`); other tensors are
      dequantized as usual.

  Returns:
    The config, the params dict (lorajax layout) and the metadata dict.

  Raises:
    ValueError: For an unsupported architecture, tensor type or tensor name.
  """
  fields, tensors = read_gguf(os.fspath(path))
  names = {t.name for t in tensors}
  config = read_config(fields, names, path, dtype=dtype)
  if quantized and scan_layers:
    raise ValueError(
        f"{path!r}: `quantized=True` keeps the file's blocks per layer, and"
        " stacking quantized layers for `scan_layers=True` is not supported"
        " yet. Pass `scan_layers=False` (or leave it unset) with"
        " `quantized=True`.")
  if quantized:
    scan_layers = False  # Quantized blocks stay per layer (unrolled).
  config = dataclasses.replace(config, scan_layers=scan_layers, remat=remat)
  permute = fields.get("general.architecture") == "llama"
  params: dict = {}
  unknown = []
  for t in tensors:
    shape = t.shape
    name = t.name
    m = _BLK_RE.fullmatch(name)
    if name == "token_embd.weight":
      dest, transpose = ["model", "embed_tokens", "embedding"], False
    elif name == "output_norm.weight":
      dest, transpose = ["model", "norm", "scale"], False
    elif name == "output.weight":
      dest, transpose = ["lm_head", "kernel"], True
    elif m and m.group(2) in _BLK_NAMES:
      i, kind, leaf = m.groups()
      group, mod = _BLK_NAMES[kind]
      dest = ["model", "layers", i, group, mod,
              "kernel" if leaf == "weight" else "bias"]
      transpose = leaf == "weight"
    elif m and m.group(2) in _BLK_NORMS and m.group(3) == "weight":
      dest = ["model", "layers", m.group(1), _BLK_NORMS[m.group(2)], "scale"]
      transpose = False
    else:
      unknown.append(name)
      continue
    heads = None
    if permute and m and m.group(2) == "attn_q":
      heads = config.num_attention_heads
    elif permute and m and m.group(2) == "attn_k":
      heads = config.num_key_value_heads
    if (quantized and int(t.tensor_type) in _BLOCK_BYTES and len(shape) == 2
        and (m is None or m.group(3) == "weight")):
      _set(params, dest, quantized_blocks(
          t.data, int(t.tensor_type), shape, dtype=dtype,
          transpose=transpose, heads=heads, name=name))
      continue
    w = dequantize(t.data, int(t.tensor_type), shape, name)
    if permute and m and m.group(2) == "attn_q":
      w = unpermute_rotary(w, config.num_attention_heads)
    elif permute and m and m.group(2) == "attn_k":
      assert config.num_key_value_heads is not None  # Set by __post_init__.
      w = unpermute_rotary(w, config.num_key_value_heads)
    if transpose:
      w = w.T
    _set(params, dest, jnp.asarray(w, dtype=dtype))
  if unknown:
    raise ValueError(
        f"{path!r} holds tensors a Llama-family model does not have: "
        f"{unknown[:8]}. lorajax.models.llama reads llama and qwen2 GGUFs."
    )
  if config.vocab_size == 0:
    config = _replace_vocab(
        config, params["model"]["embed_tokens"]["embedding"].shape[0])
  if config.scanned:
    params = llama_lib.stack_layers(params)
  return config, params, fields


def _replace_vocab(config: LlamaConfig, vocab: int) -> LlamaConfig:
  import dataclasses  # noqa: PLC0415

  return dataclasses.replace(config, vocab_size=vocab)
