"""A small safetensors reader on NumPy (bfloat16 and float8 via ml_dtypes).

`safetensors.safe_open(..., framework="flax")` imports flax (and the numpy
framework has no bfloat16), so the core reads files itself. The format is
simple: an 8-byte little-endian header length `n`, `n` bytes of JSON mapping
each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` (plus
an optional `"__metadata__"` string map), then the raw little-endian data,
offsets counted from the end of the header. Tensors come back as read-only
NumPy views of a memory map: nothing is read until used, and nothing is
unpickled.
"""

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

# The safetensors dtype names (see the format's `Dtype` enum).
DTYPES: Mapping[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}

_MAX_HEADER = 100 * 2**20  # The format's own limit (100 MB).


class SafetensorsFile(Mapping[str, np.ndarray]):
  """A safetensors file as a read-only mapping `name -> np.ndarray`.

  Example:
    >>> with SafetensorsFile(path) as f:  # doctest: +SKIP
    ...   w = f["model.embed_tokens.weight"]

  Attributes:
    path: The file's path.
    metadata: The header's `__metadata__` (string to string), or `{}`.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    size = os.path.getsize(self.path)
    with open(self.path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise self._error(f"is {size} bytes long, shorter than the 8-byte"
                          " header length")
      (n,) = struct.unpack("<Q", head)
      if n > _MAX_HEADER or 8 + n > size:
        raise self._error(f"declares a {n}-byte header but the file has"
                          f" {size} bytes")
      raw = f.read(n)
    try:
      header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise self._error(f"has a header that is not JSON ({e})") from None
    if not isinstance(header, dict):
      raise self._error("has a header that is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    self.metadata: dict[str, str] = dict(meta)
    self._start = 8 + n
    data_size = size - self._start
    self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
      try:
        dtype = DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
      except KeyError as e:
        raise self._error(f"tensor {name!r} has an unknown dtype or a missing"
                          f" field ({e}); supported dtypes:"
                          f" {sorted(DTYPES)}") from None
      except (TypeError, ValueError):
        raise self._error(f"tensor {name!r} has a malformed header entry"
                          f" {info!r}") from None
      want = math.prod(shape) * dtype.itemsize
      if not 0 <= begin <= end <= data_size or end - begin != want:
        raise self._error(
            f"tensor {name!r} ({info['dtype']}{list(shape)}, {want} bytes)"
            f" has data offsets [{begin}, {end}] outside the {data_size}"
            " data bytes or of the wrong length; the file is truncated or"
            " corrupt")
      self._entries[name] = (dtype, shape, begin, end)
    self._map: np.ndarray | None = None

  def _error(self, what: str) -> ValueError:
    return ValueError(f"{self.path}: not a valid safetensors file: it {what}."
                      " Re-download or re-export the file.")

  def _data(self) -> np.ndarray:
    if self._map is None:
      if os.path.getsize(self.path) == self._start:
        self._map = np.zeros(0, np.uint8)
      else:
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r",
                              offset=self._start)
    return self._map

  def __getitem__(self, name: str) -> np.ndarray:
    try:
      dtype, shape, begin, end = self._entries[name]
    except KeyError:
      raise KeyError(f"{self.path} has no tensor {name!r}.") from None
    if begin == end:
      return np.zeros(shape, dtype)
    buf = self._data()[begin:end]
    return buf.view(dtype).reshape(shape)

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def keys(self):
    return self._entries.keys()

  def get_tensor(self, name: str) -> np.ndarray:
    """The tensor `name` (the `safetensors.safe_open` spelling)."""
    return self[name]

  def close(self) -> None:
    """Drops the memory map (tensors already returned keep it alive)."""
    self._map = None

  def __enter__(self) -> "SafetensorsFile":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file, as NumPy arrays (copies).

  Args:
    path: The `.safetensors` file.

  Returns:
    A dict from tensor name to array (bfloat16 as `ml_dtypes.bfloat16`).

  Raises:
    ValueError: If the file is not a valid safetensors file.
  """
  with SafetensorsFile(path) as f:
    return {k: np.array(f[k]) for k in f}
