"""Parameter counts: what is trained and what stays frozen."""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lorajax._src.core import adapter as adapter_lib
from lorajax._src.core import paths as paths_lib
from lorajax._src.core import quant as quant_lib
from lorajax._src.core.typing import PyTree


@dataclasses.dataclass(frozen=True)
class WeightSummary:
  """One adapted weight.

  Attributes:
    path: The weight's path string.
    shape: The weight's shape.
    axes: The weight's axes string.
    rank: Adapter rank.
    scale: Adapter scale.
    trainable: Number of adapter parameters (`a` and `b`).
    frozen: Number of weight parameters.
  """

  path: str
  shape: tuple[int, ...]
  axes: str
  rank: int
  scale: float
  trainable: int
  frozen: int


@dataclasses.dataclass(frozen=True)
class Summary:
  """Trainable versus frozen parameters; `print` it for a table.

  Attributes:
    weights: One row per adapted weight.
    trainable: Adapter parameter count.
    trainable_bytes: Adapter bytes.
    frozen: Base parameter count (all leaves of `params`).
    frozen_bytes: Base bytes.
  """

  weights: tuple[WeightSummary, ...]
  trainable: int
  trainable_bytes: int
  frozen: int
  frozen_bytes: int

  @property
  def trainable_fraction(self) -> float:
    return self.trainable / max(self.frozen, 1)

  def __str__(self) -> str:
    rows = [("weight", "shape", "axes", "rank", "scale", "trainable",
             "frozen")]
    for w in self.weights:
      rows.append((w.path, "x".join(map(str, w.shape)), w.axes, str(w.rank),
                   f"{w.scale:g}", f"{w.trainable:,}", f"{w.frozen:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(wd) if i == 0 else c.rjust(wd)
                       for i, (c, wd) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("-" * len(lines[0]))
    lines.append(
        f"trainable {self.trainable:,} params ({_human(self.trainable_bytes)})"
        f" = {100 * self.trainable_fraction:.3f}% of frozen"
        f" {self.frozen:,} params ({_human(self.frozen_bytes)})"
    )
    return "\n".join(lines)


def _human(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
    n /= 1024
  return f"{n} B"


def _size(x: Any) -> tuple[int, int]:
  n = math.prod(x.shape)
  return n, n * jnp.dtype(x.dtype).itemsize


def summary(params: PyTree, adapter: PyTree) -> Summary:
  """Counts trainable (adapter) and frozen (params) parameters and bytes.

  Args:
    params: The base parameter pytree (arrays or `jax.ShapeDtypeStruct`).
    adapter: The adapter pytree for `params`.

  Returns:
    A `Summary`; `print(summary)` shows a per-weight table and the totals.
  """
  adapter_lib.check_fit(params, adapter)
  nodes, a_def = jax.tree_util.tree_flatten_with_path(
      adapter, is_leaf=adapter_lib.is_node)
  weights = a_def.flatten_up_to(params)
  rows = []
  t_n = t_b = 0
  for (kp, node), w in zip(nodes, weights):
    if node is None:
      continue
    # Trained arrays: a, b (+ DoRA's magnitude); VeRA trains only its
    # vectors (its shared projections are frozen and not counted).
    if isinstance(node, adapter_lib.VeraWeight):
      trained = (node.lambda_d, node.lambda_b)
    else:
      trained = (node.a, node.b) + (
          () if node.magnitude is None else (node.magnitude,))
    sizes = [_size(x) for x in trained]
    n_w, b_w = sum(n for n, _ in sizes), sum(b for _, b in sizes)
    t_n += n_w
    t_b += b_w
    rows.append(WeightSummary(
        path=paths_lib.path_str(kp), shape=tuple(w.shape), axes=node.axes,
        rank=node.rank, scale=node.scale, trainable=n_w,
        frozen=math.prod(w.shape)))
  f_n = f_b = 0
  for leaf in jax.tree.leaves(params, is_leaf=quant_lib.is_quantized):
    if quant_lib.is_quantized(leaf):  # Its weights, at their stored bytes.
      n, b = math.prod(leaf.shape), leaf.nbytes
    else:
      n, b = _size(leaf)
    f_n += n
    f_b += b
  return Summary(tuple(rows), t_n, t_b, f_n, f_b)
