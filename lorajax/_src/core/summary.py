"""Parameter counts: what is trained and what stays frozen."""

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from lorajax._src.core import adapter as adapter_lib
from lorajax._src.core import config as config_lib
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
    rule: With `summary(..., config=...)`: the target that selected the
      weight (a preset with the naming family it recognised, or the
      regex); empty otherwise.
  """

  path: str
  shape: tuple[int, ...]
  axes: str
  rank: int
  scale: float
  trainable: int
  frozen: int
  rule: str = ""


@dataclasses.dataclass(frozen=True)
class SkippedWeight:
  """A weight with at least two axes that is not adapted.

  Attributes:
    path: The weight's path string.
    shape: The weight's shape.
    why: Why `config` left it out (the exclude entry, an embedding table or
      output head, a name no preset recognises, no matching regex).
  """

  path: str
  shape: tuple[int, ...]
  why: str


@dataclasses.dataclass(frozen=True)
class Summary:
  """Trainable versus frozen parameters; `print` it for a table.

  Attributes:
    weights: One row per adapted weight.
    trainable: Adapter parameter count.
    trainable_bytes: Adapter bytes.
    frozen: Base parameter count (all leaves of `params`).
    frozen_bytes: Base bytes.
    skipped: With `summary(..., config=...)`: every weight with at least two
      axes that is not adapted, and why; empty otherwise.
  """

  weights: tuple[WeightSummary, ...]
  trainable: int
  trainable_bytes: int
  frozen: int
  frozen_bytes: int
  skipped: tuple[SkippedWeight, ...] = ()

  @property
  def trainable_fraction(self) -> float:
    return self.trainable / max(self.frozen, 1)

  def __str__(self) -> str:
    with_rule = any(w.rule for w in self.weights)
    head = ("weight", "shape", "axes", "rank", "scale", "trainable",
            "frozen") + (("rule",) if with_rule else ())
    groups = _group([(w.path, (w.shape, w.axes, w.rank, w.scale, w.rule),
                      (w.trainable, w.frozen)) for w in self.weights])
    rows = [head]
    for path, (shape, axes, rank, scale, rule), (tr, fr) in groups:
      rows.append((path, "x".join(map(str, shape)), axes, str(rank),
                   f"{scale:g}", f"{tr:,}", f"{fr:,}")
                  + ((rule,) if with_rule else ()))
    lines = _table(rows, left=(0, len(head) - 1) if with_rule else (0,))
    if len(groups) < len(self.weights):
      lines.insert(0, f"{len(self.weights)} adapted weights; a row whose path"
                   " holds {a-b} stands for one weight per index, with its"
                   " counts summed")
    lines.append(
        f"trainable {self.trainable:,} params ({_human(self.trainable_bytes)})"
        f" = {100 * self.trainable_fraction:.3f}% of frozen"
        f" {self.frozen:,} params ({_human(self.frozen_bytes)})"
    )
    if self.skipped:
      skipped = _group([(k.path, (k.shape, k.why), (1,))
                        for k in self.skipped])
      lines.append("")
      lines.append(f"not adapted: {len(self.skipped)} weights with >= 2 axes")
      lines += _table([("weight", "shape", "why")] + [
          (path, "x".join(map(str, shape)), why)
          for path, (shape, why), _ in skipped], left=(0, 2))
    return "\n".join(lines)


# Above this many rows, weights that differ only in a layer index share a
# row (a 30-layer model prints 7 rows, not 210).
_GROUP_ABOVE = 40
_INDEX = re.compile(r"(^|_)(\d+)$")


def _group(items):
  """Merges `(path, key, counts)` items differing only in index parts.

  Only when there are more than `_GROUP_ABOVE` items; indices show as
  runs like `{0-2,4-29}`, counts are summed.
  """
  if len(items) <= _GROUP_ABOVE:
    return items
  merged: dict[tuple, list] = {}
  for path, key, counts in items:
    parts = path.split("/")
    idx = tuple(m.group(2) if (m := _INDEX.search(p)) else None
                for p in parts)
    pattern = tuple(_INDEX.sub(r"\1*", p) for p in parts)
    slot = merged.setdefault((pattern, key), [[], [0] * len(counts)])
    slot[0].append(idx)
    slot[1] = [a + b for a, b in zip(slot[1], counts)]
  out = []
  for (pattern, key), (idxs, counts) in merged.items():
    parts = []
    for j, p in enumerate(pattern):
      vals = sorted({i[j] for i in idxs if i[j] is not None}, key=int)
      if "*" not in p or not vals:
        parts.append(p)
        continue
      rng = vals[0] if len(vals) == 1 else "{" + _runs(vals) + "}"
      parts.append(p.replace("*", rng))
    out.append(("/".join(parts), key, tuple(counts)))
  return out


def _runs(vals: list[str]) -> str:
  """`["0", "1", "2", "4"]` -> `"0-2,4"`."""
  nums = [int(v) for v in vals]
  out, start = [], 0
  for j in range(1, len(nums) + 1):
    if j == len(nums) or nums[j] != nums[j - 1] + 1:
      a, b = nums[start], nums[j - 1]
      out.append(str(a) if a == b else f"{a}-{b}")
      start = j
  return ",".join(out)


def _table(rows, left=(0,)) -> list[str]:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(wd) if i in left else c.rjust(wd)
                     for i, (c, wd) in enumerate(zip(r, widths))).rstrip()
           for r in rows]
  width = max(len(x) for x in lines)
  lines.insert(1, "-" * width)
  lines.append("-" * width)
  return lines


def _human(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
    n /= 1024
  return f"{n} B"


def _size(x: Any) -> tuple[int, int]:
  n = math.prod(x.shape)
  return n, n * jnp.dtype(x.dtype).itemsize


def summary(params: PyTree, adapter: PyTree, *,
            config: config_lib.LoraConfig | None = None) -> Summary:
  """Counts trainable (adapter) and frozen (params) parameters and bytes.

  With `config` (the `LoraConfig` the adapter was made with), the summary
  also says why: each adapted weight's row names the target that selected
  it (for a preset, the naming family it recognised, e.g. `all-linear
  (penzai)`), and every weight with at least two axes that is not adapted
  is listed with the reason (`embedding table`, `output head`, an `exclude`
  entry, a name no preset knows). Weights that differ only in a layer index
  share one row when the table would be long.

  Args:
    params: The base parameter pytree (arrays or `jax.ShapeDtypeStruct`).
    adapter: The adapter pytree for `params`.
    config: Optional; the `LoraConfig` that selected the adapted weights.

  Returns:
    A `Summary`; `print(summary)` shows a per-weight table and the totals.

  Raises:
    ValueError: If `adapter` does not fit `params`.
    TypeError: If `config` is not a `LoraConfig`.
  """
  if config is not None and not isinstance(config, config_lib.LoraConfig):
    raise TypeError(
        f"`config` must be a lorajax.LoraConfig or None; got {config!r}.")
  adapter_lib.check_fit(params, adapter)
  nodes, a_def = jax.tree_util.tree_flatten_with_path(
      adapter, is_leaf=adapter_lib.is_node)
  weights = a_def.flatten_up_to(params)
  rows = []
  adapted = set()
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
    path = paths_lib.path_str(kp)
    adapted.add(path)
    rule = ""
    if config is not None:
      hit, why = config._explain(  # noqa: SLF001
          path, len(w.shape), w.dtype)
      rule = why if hit else f"not selected by `config`: {why}"
    rows.append(WeightSummary(
        path=path, shape=tuple(w.shape), axes=node.axes,
        rank=node.rank, scale=node.scale, trainable=n_w,
        frozen=math.prod(w.shape), rule=rule))
  f_n = f_b = 0
  for leaf in jax.tree.leaves(params, is_leaf=quant_lib.is_quantized):
    if quant_lib.is_quantized(leaf):  # Its weights, at their stored bytes.
      n, b = math.prod(leaf.shape), leaf.nbytes
    else:
      n, b = _size(leaf)
    f_n += n
    f_b += b
  skipped = []
  if config is not None:
    for path, leaf in paths_lib.leaves_with_paths(
        params, is_leaf=quant_lib.is_quantized):
      shape = tuple(leaf.shape)
      if path in adapted or len(shape) < 2:
        continue
      hit, why = config._explain(path, len(shape), leaf.dtype)  # noqa: SLF001
      skipped.append(SkippedWeight(
          path, shape, why if not hit else f"selected by {why}, but the"
          " adapter has no entry for it"))
  return Summary(tuple(rows), t_n, t_b, f_n, f_b, tuple(skipped))
