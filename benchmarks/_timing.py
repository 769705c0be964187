"""Shared helpers of the benchmark scripts: round-robin timing and output.

Every benchmark that compares variants times them the same way: after
warm-up, each round runs every variant once in turn, so all of them see the
same machine load; a variant's figure is the median over rounds, and a ratio
is the median of the per-round ratios.
"""

import os
import platform
import statistics
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, Protocol


class Timed(Protocol):
  """A variant: `run()` does one timed step and returns its seconds."""

  times: list[float]

  def run(self) -> float: ...


def round_robin(variants: Sequence[Timed], *, warmup: int, repeats: int,
                run: Callable[[Timed], float] | None = None) -> None:
  """Runs `warmup + repeats` rounds; appends the timed rounds to `.times`."""
  for i in range(warmup + repeats):
    for v in variants:
      t = v.run() if run is None else run(v)
      if i >= warmup:
        v.times.append(t)


def median_ratio(times: Sequence[float], ref: Sequence[float]) -> float:
  """The median over rounds of `times[i] / ref[i]`."""
  return statistics.median(t / r for t, r in zip(times, ref, strict=True))


def environment() -> dict[str, Any]:
  """What the numbers were measured on."""
  import jax  # noqa: PLC0415 (the scripts set XLA flags before importing)

  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind,
          "cpu_count": os.cpu_count(), "machine": platform.machine()}


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to a temporary file next to `path`, then renames it."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
