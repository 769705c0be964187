"""Quantized frozen bases (QLoRA): NF4, int8 and GGUF block formats.

A `QuantizedWeight` stands in a params tree where a dense weight was. Its
array children (codes, scales, ...) are pytree leaves, so `jax.jit`,
`lax.scan` over stacked layers, `jax.device_put` and shardings treat them as
they treat any array; its format, block size, block axis and dense dtype are
static. Every array of the node has the dense weight's number of axes and
its sizes on every axis but the block axis, so:

- an op that leaves the block axis whole (slicing a stacked axis, `scan`,
  transposes, squeezes) applies to every child as it would to the weight;
- a `PartitionSpec` of the dense weight is also a valid spec for each child
  (blocks along a sharded axis stay whole when its shards hold whole blocks).

Formats (blocks run along `axis`; `B` values per block):

| format | codes | per block | value |
|---|---|---|---|
| `nf4`  | 4-bit, 2 per byte | float32 absmax (B = 64) | `NF4[q] * absmax` |
| `nf4` + `double_quant` | as `nf4` | int8 absmax codes; per 256 of them |
|   |   | a float32 scale and offset | as `nf4` |
| `int8` | int8 | float32 absmax / 127 per output channel | `q * scale` |
| `q8_0` | int8 | float16 `d` (B = 32) | `q * d` |
| `q4_0` | 4-bit | float16 `d` (B = 32) | `(q - 8) * d` |
| `q4_1` | 4-bit | float16 `d`, `m` (B = 32) | `q * d + m` |

4-bit codes are packed as GGUF packs them: the byte `j` of a block holds
value `j` in its low nibble and value `j + B/2` in its high nibble, so a
GGUF file's Q4_0/Q4_1 blocks are used as they are.

`qdot` is the quantized matmul: a `jax.custom_vjp` whose residuals are the
codes and scales (never a dense weight), whose backward dequantizes again.

References:
  Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs".
  Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large
  Language Models".
"""

import dataclasses
import functools
import re
import statistics
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lorajax._src.core import jax_compat as jc
from lorajax._src.core import paths as paths_lib
from lorajax._src.core.extend import LazyBase, StructuralOp

PyTree = Any

FORMATS = ("nf4", "int8", "q4_0", "q4_1", "q8_0")
"""The storage formats of a `QuantizedWeight`: NF4 (QLoRA), int8 per output
channel, and the GGUF blocks Q4_0, Q4_1 and Q8_0."""
_FOUR_BIT = ("nf4", "q4_0", "q4_1")
_BLOCK = {"nf4": 64, "q4_0": 32, "q4_1": 32, "q8_0": 32}
_DQ_GROUP = 256  # Absmaxes per group in NF4 double quantization.


def _nf4_levels() -> np.ndarray:
  """The 16 NormalFloat-4 levels, built as the QLoRA paper builds them.

  8 quantiles of N(0, 1) on the positive side and 7 on the negative side
  (evenly spaced probabilities from 1 - delta to 1/2, delta chosen so that
  the extreme quantile stays finite), an exact zero, normalised to [-1, 1].
  """
  offset = 0.9677083  # (1 - 1/(2*15) + 1 - 1/(2*16)) / 2 in the paper.
  nd = statistics.NormalDist()
  pos = [nd.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  neg = [-nd.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  levels = np.array(sorted([*pos, 0.0, *neg]), np.float64)
  return (levels / levels.max()).astype(np.float32)


NF4_LEVELS = _nf4_levels()


class QuantizationWarning(UserWarning):
  """Quantized base weights were dequantized into a dense model (`merge`)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight(LazyBase):
  """A frozen weight stored in a quantized block format.

  A `LazyBase` (lorajax/_src/core/extend.py): `lorajax.lora(fn)` traces `fn`
  with a dense array of `shape` and `dtype` in its place, applies casts and
  structural ops (a scan over stacked layers, transposes, slices) to its
  codes and scales, and dequantizes it only at a matmul (`qdot`) or a row
  lookup.

  Attributes:
    codes: The quantized values: uint8 (two 4-bit codes per byte) or int8,
      with the dense shape except along `axis` (half its size when packed).
    scales: One scale per block (dense shape with `axis` cut to the number of
      blocks): float32 absmax (`nf4`), float16 `d` (GGUF), float32 `scale`
      (`int8`), or int8 codes of the absmax under double quantization.
    mins: `q4_1`'s per-block float16 minimum `m`, else None.
    scale_scales: Double quantization only: float32 scale of each group of
      256 absmax codes along the scales' last axis, else None.
    scale_offset: Double quantization only: float32 mean subtracted from each
      group of absmaxes before they were quantized, else None.
    format: One of `FORMATS`.
    block: Values per block along `axis`.
    axis: The block axis, as a negative index.
    dtype: The dense dtype the weight stands for (what `fn` is traced with);
      dequantization produces it.
  """

  codes: jax.Array
  scales: jax.Array
  mins: jax.Array | None = None
  scale_scales: jax.Array | None = None
  scale_offset: jax.Array | None = None
  format: str = dataclasses.field(default="nf4", metadata=dict(static=True))
  block: int = dataclasses.field(default=64, metadata=dict(static=True))
  axis: int = dataclasses.field(default=-2, metadata=dict(static=True))
  dtype: Any = dataclasses.field(default=np.dtype("float32"),
                                 metadata=dict(static=True))

  def __post_init__(self):
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

  @property
  def shape(self) -> tuple[int, ...]:  # type: ignore[override]
    """The dense weight's shape."""
    s = list(self.codes.shape)
    if self.format in _FOUR_BIT:
      s[self.axis] *= 2
    return tuple(s)

  @property
  def ndim(self) -> int:
    return len(self.codes.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def nbytes(self) -> int:
    """Bytes of all children: what the weight costs in memory."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(self))

  @property
  def double_quant(self) -> bool:
    return self.scale_scales is not None

  def astype(self, dtype: Any) -> "QuantizedWeight":
    """The same codes, dequantizing to `dtype` (no data is touched)."""
    return dataclasses.replace(self, dtype=jnp.dtype(dtype))

  # -- the LazyBase protocol (used by `lorajax.lora`) --

  def dequantize(self) -> jax.Array:
    """The dense weight in `dtype` (see the module function `dequantize`)."""
    return dequantize(self)

  def structural(self, op: StructuralOp) -> "QuantizedWeight | None":
    return _structural(self, op)

  def scan_split(self):
    if _pos(self.axis, self.ndim) == 0:
      return None
    # Slicing axis 0 of every child gives the node of one slice: the block
    # axis is stored as a negative index, so it stays right.
    return self, lambda sl: sl

  def gather_rows(self, use: Any) -> jax.Array | None:
    """An embedding lookup on the blocks (dense rows), else None.

    A gather that keeps only the block axis of the weight (it collapses or
    indexes every other axis) is a row lookup: its rows of codes and scales
    are gathered and dequantized. Gathers that keep more axes (selecting
    stacked slices) are left to `structural`, which keeps them quantized.
    """
    if use.position != 0 or use.primitive.name != "gather":
      return None
    g = jc.gather_dims(use.params)
    # Axes sliced to one element count as indexed (`vmap` of `w[i]` keeps
    # them as size-1 axes instead of collapsing them).
    kept = [j for j in range(self.ndim) if j not in g.collapsed_slice_dims
            and j not in g.operand_batching_dims and g.slice_sizes[j] != 1]
    if kept != [_pos(self.axis, self.ndim)]:
      return None
    out = _use(self, use.primitive, use.params, list(use.operands), 0)
    return None if out is None else out[0]

  def use(self, prim, params, operands, position):
    out = _use(self, prim, params, list(operands), position)
    if out is not None:
      return out
    return super().use(prim, params, operands, position)

  def __repr__(self) -> str:
    dq = ", double_quant" if self.double_quant else ""
    return (f"QuantizedWeight({self.format}{dq}, shape={self.shape},"
            f" block={self.block}, axis={self.axis}, dtype={self.dtype})")


def is_quantized(x: Any) -> bool:
  """True for a `QuantizedWeight` (use it as `is_leaf` over params)."""
  return isinstance(x, QuantizedWeight)


def _pos(axis: int, ndim: int) -> int:
  return axis % ndim


# -- dequantization ------------------------------------------------------------


def _unpack4(codes: jax.Array, p: int, block: int,
             tie: jax.Array | None = None) -> jax.Array:
  """Packed nibbles (`d/2` along axis `p`) -> codes 0..15 as (.., nb, B, ..).

  With `tie`, the nibbles are split in float32 after adding `tie`, so the
  unpacking depends on it (and is placed with the rest of the
  dequantization); the result is then float32.
  """
  shape = codes.shape
  nb = shape[p] * 2 // block
  c = codes.reshape((*shape[:p], nb, block // 2, *shape[p + 1:]))
  if tie is None:
    lo, hi = c & 0x0F, c >> 4
  else:
    cf = c.astype(jnp.float32) + tie
    hi = jnp.floor(cf * (1 / 16))
    lo = cf - 16 * hi
  return jnp.concatenate([lo, hi], axis=p + 1)


def _group_expand(x: jax.Array, n: int) -> jax.Array:
  """Repeats each entry of the last axis `_DQ_GROUP` times, keeps `n`."""
  return jnp.repeat(x, _DQ_GROUP, axis=-1)[..., :n]


def block_scales(q: QuantizedWeight) -> jax.Array:
  """The per-block scales in float32 (undoing double quantization)."""
  if not q.double_quant:
    return q.scales.astype(jnp.float32)
  n = q.scales.shape[-1]
  ss, so = q.scale_scales, q.scale_offset
  assert ss is not None and so is not None  # double_quant sets both
  return (q.scales.astype(jnp.float32) * _group_expand(ss, n)
          + _group_expand(so, n))


def dequantize(q: QuantizedWeight, dtype: Any = None, *,
               tie: jax.Array | None = None) -> jax.Array:
  """The dense weight of `q`, computed blockwise.

  Args:
    q: A quantized weight.
    dtype: Result dtype; defaults to `q.dtype`. The block products run in
      this dtype, so a bfloat16 dequantization never forms float32 values.
    tie: Optional float32 scalar (zero) added to the scales and the NF4
      table: a data dependency that places the dequantization (see `qdot`).

  Returns:
    An array of `q.shape`.
  """
  dtype = jnp.dtype(q.dtype if dtype is None else dtype)
  p = _pos(q.axis, q.ndim)
  shape = q.shape
  nb = shape[p] // q.block
  blocked = (*shape[:p], nb, q.block, *shape[p + 1:])
  scale = block_scales(q)
  levels = jnp.asarray(NF4_LEVELS)
  if tie is not None:
    scale = scale + tie
    levels = levels + tie
  scale = jnp.expand_dims(scale.astype(dtype), p + 1)
  if q.format in _FOUR_BIT:
    codes = _unpack4(q.codes, p, q.block, tie)
  else:
    codes = q.codes.reshape(blocked)
  if q.format == "nf4":
    # Elementwise lookup (16 selects, fused with the rest): unlike a gather
    # from a table, it keeps the codes' sharding under explicit meshes.
    lv = levels.astype(dtype)
    vals = jnp.zeros(codes.shape, dtype)
    for k in range(1, 16):
      vals = jnp.where(codes == k, lv[k], vals)
    vals = jnp.where(codes == 0, lv[0], vals)
    out = vals * scale
  elif q.format == "q4_0":
    out = (codes.astype(dtype) - 8) * scale
  elif q.format == "q4_1":
    mins = q.mins
    assert mins is not None  # q4_1 always has them
    m = jnp.expand_dims(mins.astype(dtype), p + 1)
    out = codes.astype(dtype) * scale + m
  else:  # int8, q8_0
    out = codes.astype(dtype) * scale
  return out.reshape(shape).astype(dtype)


def dequantize_tree(tree: PyTree, dtype: Any = None) -> PyTree:
  """Replaces every `QuantizedWeight` (and `MergedWeight`) by a dense array.

  Args:
    tree: A params pytree.
    dtype: Dense dtype of dequantized weights; defaults to each weight's own
      `dtype`.

  Returns:
    The tree with plain arrays (other leaves unchanged).
  """
  def one(x):
    if is_quantized(x):
      return dequantize(x, dtype)
    if isinstance(x, MergedWeight):
      return x.merged
    return x

  return jax.tree.map(
      one, tree, is_leaf=lambda x: is_quantized(x) or isinstance(
          x, MergedWeight))


# -- quantization --------------------------------------------------------------


def _blocked(w: jax.Array, p: int, block: int) -> jax.Array:
  s = w.shape
  return w.reshape((*s[:p], s[p] // block, block, *s[p + 1:]))


def _pack4(q: jax.Array, p: int, shape: tuple[int, ...]) -> jax.Array:
  """Codes 0..15 as (.., nb, B, ..) -> packed bytes, `d/2` along `p`."""
  half = q.shape[p + 1] // 2
  lo = lax.slice_in_dim(q, 0, half, axis=p + 1)
  hi = lax.slice_in_dim(q, half, 2 * half, axis=p + 1)
  packed = (lo | (hi << 4)).astype(jnp.uint8)
  out = list(shape)
  out[p] //= 2
  return packed.reshape(out)


def _nf4_codes(x: jax.Array) -> jax.Array:
  """Index of the nearest NF4 level for values in [-1, 1]."""
  levels = jnp.asarray(NF4_LEVELS)
  mids = (levels[1:] + levels[:-1]) / 2
  return jnp.searchsorted(mids, x, side="left").astype(jnp.uint8)


def _double_quant(absmax: jax.Array):
  """Absmaxes -> (int8 codes, scale per group, offset per group)."""
  n = absmax.shape[-1]
  groups = -(-n // _DQ_GROUP)
  pad = groups * _DQ_GROUP - n
  a = jnp.pad(absmax, [(0, 0)] * (absmax.ndim - 1) + [(0, pad)])
  a = a.reshape((*absmax.shape[:-1], groups, _DQ_GROUP))
  valid = (jnp.arange(groups * _DQ_GROUP) < n).reshape(groups, _DQ_GROUP)
  count = valid.sum(-1)
  mean = jnp.where(valid, a, 0).sum(-1) / count
  centred = jnp.where(valid, a - mean[..., None], 0)
  amax = jnp.max(jnp.abs(centred), axis=-1)
  scale = jnp.where(amax > 0, amax / 127, 1.0)
  codes = jnp.clip(jnp.round(centred / scale[..., None]), -127, 127)
  codes = codes.astype(jnp.int8).reshape((*absmax.shape[:-1], -1))[..., :n]
  return codes, scale.astype(jnp.float32), mean.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("fmt", "axis", "double_quant",
                                             "dtype"))
def _quantize_array(w, *, fmt, axis, double_quant, dtype):
  w = w.astype(jnp.float32)
  p = _pos(axis, w.ndim)
  if fmt == "int8":
    amax = jnp.max(jnp.abs(w), axis=p, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127, 1.0)
    codes = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return QuantizedWeight(codes, scale.astype(jnp.float32), format="int8",
                           block=w.shape[p], axis=axis, dtype=dtype)
  block = _BLOCK[fmt]
  x = _blocked(w, p, block)
  mins = None
  if fmt == "nf4":
    absmax = jnp.max(jnp.abs(x), axis=p + 1, keepdims=True)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    q = _nf4_codes(x / safe)
    scales = jnp.squeeze(absmax, p + 1)
  elif fmt == "q8_0":
    # llama.cpp: d = absmax / 127, q = round-half-away(x / d) with the
    # float32 d; d is then stored in float16.
    amax = jnp.max(jnp.abs(x), axis=p + 1, keepdims=True)
    d = amax / 127
    inv = jnp.where(d != 0, 1.0 / d, 0.0)
    v = x * inv
    q = jnp.clip(jnp.sign(v) * jnp.floor(jnp.abs(v) + 0.5), -127, 127)
    q = q.astype(jnp.int8)
    scales = jnp.squeeze(d, p + 1).astype(jnp.float16)
  elif fmt == "q4_0":
    # llama.cpp: d = (value of largest magnitude) / -8, q = trunc(x/d + 8.5).
    idx = jnp.argmax(jnp.abs(x), axis=p + 1, keepdims=True)
    mx = jnp.take_along_axis(x, idx, axis=p + 1)
    d = mx / -8
    inv = jnp.where(d != 0, 1.0 / d, 0.0)
    q = jnp.clip(jnp.floor(x * inv + 8.5), 0, 15).astype(jnp.uint8)
    scales = jnp.squeeze(d, p + 1).astype(jnp.float16)
  else:  # q4_1: d = (max - min) / 15, q = round((x - min) / d), m = min.
    lo = jnp.min(x, axis=p + 1, keepdims=True)
    hi = jnp.max(x, axis=p + 1, keepdims=True)
    d = (hi - lo) / 15
    inv = jnp.where(d != 0, 1.0 / d, 0.0)
    q = jnp.clip(jnp.floor((x - lo) * inv + 0.5), 0, 15).astype(jnp.uint8)
    scales = jnp.squeeze(d, p + 1).astype(jnp.float16)
    mins = jnp.squeeze(lo, p + 1).astype(jnp.float16)
  codes = _pack4(q, p, w.shape) if fmt in _FOUR_BIT else q.reshape(w.shape)
  ss = so = None
  if fmt == "nf4" and double_quant:
    scales, ss, so = _double_quant(scales)
  return QuantizedWeight(codes, scales, mins, ss, so, format=fmt,
                         block=block, axis=axis, dtype=dtype)


def quantize_array(w: jax.Array, fmt: str = "nf4", *, axis: int = -2,
                   double_quant: bool = False, dtype: Any = None,
                   path: str = "weight") -> QuantizedWeight:
  """Quantizes one dense weight.

  Args:
    w: A floating array with at least one axis.
    fmt: One of `FORMATS`.
    axis: The block axis (the input features of `x @ w`: -2 for a `(in,
      out)` kernel, -1 for an embedding table or an `(out, in)` weight).
    double_quant: NF4 only: quantize the absmaxes to int8 in groups of 256.
    dtype: The dense dtype the node stands for; defaults to `w.dtype`.
    path: The weight's name for error messages.

  Returns:
    The `QuantizedWeight`.

  Raises:
    ValueError: For an unknown format, an axis out of range, or a block axis
      whose size is not a multiple of the format's block size.
  """
  if fmt not in FORMATS:
    raise ValueError(f"Unknown quantization format {fmt!r} for {path!r};"
                     f" expected one of {FORMATS}.")
  shape = tuple(w.shape)
  if not shape or not -len(shape) <= axis < len(shape):
    raise ValueError(f"`axis` {axis} is out of range for {path!r} with shape"
                     f" {shape}.")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"{path!r} has dtype {w.dtype}; only floating weights"
                     " can be quantized.")
  if double_quant and fmt != "nf4":
    raise ValueError(f"`double_quant` applies to 'nf4' only; got {fmt!r}"
                     f" for {path!r}.")
  axis = axis - len(shape) if axis >= 0 else axis
  d = shape[axis]
  if fmt != "int8" and d % _BLOCK[fmt]:
    raise ValueError(
        f"{path!r} has shape {shape}: its block axis ({axis}) has {d}"
        f" values, not a multiple of {fmt!r}'s block size {_BLOCK[fmt]}."
        " Keep it dense (map its path to None in `formats`), choose"
        " another `axis`, or use 'int8' (one scale per output channel).")
  dtype = jnp.dtype(w.dtype if dtype is None else dtype).name
  return _quantize_array(jnp.asarray(w), fmt=fmt, axis=axis,
                         double_quant=bool(double_quant), dtype=dtype)


def _default_axis(path: str) -> int:
  return -2 if path.rsplit("/", 1)[-1] == "kernel" else -1


def quantize(params: PyTree, formats: str | Mapping[str, str | None] = "nf4",
             *, double_quant: bool = False,
             axes: Mapping[str, int] | None = None,
             min_size: int = 4096) -> PyTree:
  """Quantizes the weights of a float checkpoint.

  Args:
    params: A params pytree of dense arrays.
    formats: A format name (every floating leaf with two or more axes and at
      least `min_size` values), or a dict from regexes (`re.fullmatch` on the
      leaf's path, as `LoraConfig` matches) to a format name or None (keep
      dense); the first matching key wins and unmatched leaves stay dense.
    double_quant: Quantize NF4 absmaxes again (QLoRA's double quantization).
    axes: Optional regex -> block axis overrides. By default blocks run along
      the input features: axis -2 of a leaf named `kernel` (`x @ W`), the last
      axis of any other leaf (embedding tables, `(out, in)` weights).
    min_size: With a single format name, leaves smaller than this stay dense.

  Returns:
    A params pytree with `QuantizedWeight` nodes in place of the quantized
    weights. The input is not modified.

  Raises:
    ValueError: For an unknown format, a bad regex, a `formats` key that
      matches no leaf, or a weight whose block axis does not divide into
      blocks (named by path).
  """
  if isinstance(formats, str):
    rules = None
    fmt0 = formats
    if fmt0 not in FORMATS:
      raise ValueError(f"Unknown quantization format {fmt0!r}; expected one"
                       f" of {FORMATS}.")
  else:
    rules = []
    for k, v in dict(formats).items():
      try:
        rx = re.compile(k)
      except re.error as e:
        raise ValueError(
            f"`formats` key {k!r} is not a valid regex: {e}.") from None
      if v is not None and v not in FORMATS:
        raise ValueError(f"`formats[{k!r}]` is {v!r}; expected one of"
                         f" {FORMATS} or None.")
      rules.append((k, rx, v))
  axis_rules = []
  for k, ax in dict(axes or {}).items():
    try:
      axis_rules.append((re.compile(k), int(ax)))
    except re.error as e:
      raise ValueError(
          f"`axes` key {k!r} is not a valid regex: {e}.") from None
  used = set()
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=is_quantized)
  out, errors = [], []
  for kp, leaf in flat:
    path = paths_lib.path_str(kp)
    if is_quantized(leaf) or not hasattr(leaf, "shape"):
      out.append(leaf)
      continue
    if rules is None:
      fmt = fmt0 if (len(leaf.shape) >= 2 and np.prod(leaf.shape) >= min_size
                     and jnp.issubdtype(leaf.dtype, jnp.floating)) else None
    else:
      hit = next(((k, v) for k, rx, v in rules if rx.fullmatch(path)), None)
      fmt = None
      if hit is not None:
        used.add(hit[0])
        fmt = hit[1]
    if fmt is None:
      out.append(leaf)
      continue
    axis = next((a for rx, a in axis_rules if rx.fullmatch(path)),
                _default_axis(path))
    try:
      out.append(quantize_array(leaf, fmt, axis=axis,
                                double_quant=double_quant and fmt == "nf4",
                                path=path))
    except ValueError as e:
      errors.append(str(e))
      out.append(leaf)
  if rules is not None:
    unused = [k for k, _, _ in rules if k not in used]
    if unused:
      errors.append(
          f"`formats` keys {unused!r} fullmatch no leaf. Leaves:\n"
          + paths_lib.format_paths([paths_lib.path_str(p) for p, _ in flat]))
  if errors:
    raise ValueError("lorajax.quantize failed:\n- " + "\n- ".join(errors))
  return jax.tree_util.tree_unflatten(treedef, out)


# -- the quantized matmul ------------------------------------------------------


def qdot(x: jax.Array, q: QuantizedWeight, *, dimension_numbers: Any,
         x_is_lhs: bool = True, precision: Any = None,
         preferred_element_type: Any = None) -> jax.Array:
  """`lax.dot_general` of `x` with the dense weight of `q`.

  The weight is dequantized (in `q.dtype`) right at the matmul. The backward
  pass saves only `q`'s codes and scales and dequantizes again to compute
  the input gradient; `q` itself gets no gradient (it is a frozen base).

  Args:
    x: The other operand.
    q: The quantized weight.
    dimension_numbers: As for `lax.dot_general`, with `x` on the side given
      by `x_is_lhs`.
    x_is_lhs: Whether `x` is the left operand.
    precision: As for `lax.dot_general`.
    preferred_element_type: As for `lax.dot_general`.

  Returns:
    The product.
  """
  x_aval = jax.ShapeDtypeStruct(x.shape, x.dtype)

  def dot(x, w):
    lhs, rhs = (x, w) if x_is_lhs else (w, x)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)

  # Each dequantization is tied to the activation that needs it (a zero
  # times one of its elements, added to the block scales and the NF4 table;
  # XLA does not fold `0.0 * v` for floats), so XLA neither hoists every
  # layer's dequantization to the start of the program nor merges (CSE) the
  # backward's dequantization with the forward's, which would keep every
  # dense weight alive from the forward to the backward.
  # Under an explicit mesh, a sharded activation has no element to read
  # without a collective; there an optimization barrier ties the two.
  def deq(q, y):
    spec = getattr(getattr(jax.typeof(y), "sharding", None), "spec", ())
    if any(e is not None for e in (spec or ())):
      q, _ = lax.optimization_barrier((q, y))
      return dequantize(q)
    v = lax.slice(y, (0,) * y.ndim, (1,) * y.ndim).reshape(())
    return dequantize(q, tie=jnp.zeros((), jnp.float32)
                      * v.astype(jnp.float32))

  @jax.custom_vjp
  def f(x, q):
    return dot(x, deq(q, x))

  def fwd(x, q):
    return dot(x, deq(q, x)), q

  def bwd(q, g):
    w = deq(q, g)
    (dx,) = jax.linear_transpose(lambda x: dot(x, w), x_aval)(g)
    zeros = jax.tree.map(
        lambda c: (np.zeros(c.shape, jax.dtypes.float0)
                   if not jnp.issubdtype(c.dtype, jnp.floating)
                   else jnp.zeros_like(c)), q)
    return dx, zeros

  f.defvjp(fwd, bwd)
  return f(x, q)


# -- merged weights that remember their quantized base -------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MergedWeight:
  """A dense merged weight that keeps the quantized base it came from.

  `lorajax.merge` returns it for a quantized base: it acts as the dense array
  `merged` (`jnp.asarray(w)`, `x @ w`, `w.astype(...)`, `w.T`, `w[...]`,
  `np.asarray(w)`), and `lorajax.unmerge` returns `base`, bit for bit: the
  quantized base is never re-quantized. `dequantize_tree` turns it into a
  plain array (for exports).

  Attributes:
    merged: `dequantize(base) + scale * a @ b` in the compute dtype.
    base: The quantized base weight, unchanged.
  """

  merged: jax.Array
  base: QuantizedWeight

  def __jax_array__(self) -> jax.Array:
    return self.merged

  def __array__(self, dtype=None, copy=None):
    out = np.asarray(self.merged)
    return out if dtype is None else out.astype(dtype)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.merged.shape)

  @property
  def dtype(self) -> Any:
    return self.merged.dtype

  @property
  def ndim(self) -> int:
    return self.merged.ndim

  @property
  def T(self) -> jax.Array:
    return self.merged.T

  def astype(self, dtype: Any) -> jax.Array:
    return self.merged.astype(dtype)

  def reshape(self, *shape: Any) -> jax.Array:
    return self.merged.reshape(*shape)

  def __getitem__(self, idx: Any) -> jax.Array:
    return self.merged[idx]

  def __matmul__(self, other: Any) -> jax.Array:
    return self.merged @ other

  def __rmatmul__(self, other: Any) -> jax.Array:
    return other @ self.merged


def is_merged(x: Any) -> bool:
  """True for a `MergedWeight`."""
  return isinstance(x, MergedWeight)


# -- the LazyBase hooks --------------------------------------------------------


def _single_level(q: QuantizedWeight) -> QuantizedWeight:
  """`q` with plain float32 block scales (double quantization undone)."""
  if not q.double_quant:
    return q
  return dataclasses.replace(q, scales=block_scales(q), scale_scales=None,
                             scale_offset=None)


def _children(q: QuantizedWeight) -> dict[str, jax.Array]:
  return {k: getattr(q, k) for k in ("codes", "scales", "mins",
                                     "scale_scales", "scale_offset")
          if getattr(q, k) is not None}


def _structural(q: QuantizedWeight, op: StructuralOp
                ) -> QuantizedWeight | None:
  """`op` applied to every child, or None when it cuts the block axis.

  Each child holds every weight axis, with the block axis resized (packed
  codes, one scale per block); it is handed to `op.apply_to` with the block
  axis moved last as an axis of its own, so the op acts on the other axes
  only. Under double quantization the group scales run along the last axis,
  so unless the block axis is last they are first expanded back to plain
  scales.
  """
  if op.name == "convert_element_type":
    new = jc.convert_new_dtype(op.params)
    if not jnp.issubdtype(new, jnp.floating):
      return None
    return q.astype(new)
  n, p = q.ndim, _pos(q.axis, q.ndim)
  hits = [k for k, src in enumerate(op.sources) if p in src]
  if (len(hits) != 1 or op.sources[hits[0]] != (p,)
      or op.out_shape[hits[0]] != op.in_shape[p]):
    return None  # The op splits, merges, cuts or copies the block axis.
  k = hits[0]
  if p != n - 1:
    q = _single_level(q)
  held_in = [j for j in range(n) if j != p]
  held_out = [j for j in range(len(op.out_shape)) if j != k]

  def one(x):
    y = op.apply_to(jnp.moveaxis(x, p, -1), held_in, held_out)
    return jnp.moveaxis(y, -1, k)

  try:
    kids = {name: one(x) for name, x in _children(q).items()}
  except (TypeError, ValueError):
    return None
  return dataclasses.replace(q, **kids, axis=k - len(op.out_shape))


def _use(q: QuantizedWeight, prim: Any, params: Mapping[str, Any],
         operands: list[Any], position: int) -> list[jax.Array] | None:
  """Matmuls on the blocks (`qdot`) and row lookups; None for the rest."""
  name = prim.name
  if name == "dot_general" and len(operands) == 2:
    x = operands[1 - position]
    if is_quantized(x):
      return None
    return [qdot(x, q, dimension_numbers=params["dimension_numbers"],
                 x_is_lhs=position == 1, precision=params.get("precision"),
                 preferred_element_type=params.get(
                     "preferred_element_type"))]
  if name == "gather" and position == 0:
    # Rows of an embedding table (any gather that keeps the block axis
    # whole): gather codes and scales, dequantize just the gathered rows.
    idx = operands[1]
    gd = jc.gather_dims(dict(params))
    sizes = gd.slice_sizes
    n, p = q.ndim, _pos(q.axis, q.ndim)
    batching = gd.operand_batching_dims
    # The block axis must be taken whole; a start index on it (`vmap` of
    # `w[i]` indexes every axis) then selects the same whole slice of the
    # codes and scales (or puts the window out of bounds for all of them).
    if (is_quantized(idx) or p in gd.collapsed_slice_dims or p in batching
        or sizes[p] != q.shape[p]):
      return None
    if p != n - 1 and sizes[-1] != q.shape[-1]:
      q = _single_level(q)
    kept = [j for j in range(n) if j not in gd.collapsed_slice_dims
            and j not in batching]
    out_p = gd.offset_dims[kept.index(p)]

    def rows(k, v):
      sz = list(sizes)
      sz[p] = v.shape[p]
      if k in ("scale_scales", "scale_offset"):
        sz[-1] = v.shape[-1]
      kw = dict(params, slice_sizes=tuple(sz))
      if not jnp.issubdtype(v.dtype, jnp.floating):
        kw["fill_value"] = 0  # Out-of-range rows: their NaN scales rule.
      return prim.bind(v, idx, **kw)

    out_nd = len(gd.offset_dims) + (idx.ndim - 1)
    g = dataclasses.replace(q, **{k: rows(k, v) for k, v in
                                  _children(q).items()},
                            axis=out_p - out_nd)
    return [dequantize(g)]
  return None
