"""The output directory of a fine-tuning run.

Layout (`DONE` marker written last, so a crashed run is never complete):

  config.json       the run's settings (checked again on `--resume`)
  metrics.jsonl     one JSON object per step, and per evaluation
  checkpoints/<N>/  orbax checkpoints (`lorajax.CheckpointManager`): adapter,
                    optimizer state, step, LoRA config, run settings
  adapter/          PEFT-format export (adapter_config.json + safetensors)
  merged/           optional merged full weights (safetensors)
  loss.png          the loss curve
  samples.json      held-out answers before vs after
  run.json          final summary; written last, marks the run complete
"""

import json
import os
import pathlib
import tempfile
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from lorajax._src.core import fileio

DONE_FILE = "run.json"


def _write_atomic(path: pathlib.Path, write: Any) -> None:
  """Runs `write(file)` on a temp file beside `path`, then renames it."""
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    # mkstemp makes 0o600 files; give the usual umask-based mode instead.
    os.fchmod(fd, 0o666 & ~fileio.current_umask())
    with os.fdopen(fd, "w") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
  """Writes JSON to a temp file in the same directory, then renames it."""
  def write(f):
    json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
    f.write("\n")

  _write_atomic(path, write)


def _jsonable(x: Any) -> Any:
  if isinstance(x, (np.generic,)):
    return x.item()
  if isinstance(x, pathlib.Path):
    return str(x)
  raise TypeError(f"not JSON serialisable: {type(x)}")


def checkpoint_manager(directory: pathlib.Path, config: Any):
  """The run's `lorajax.CheckpointManager` (orbax; keeps the last two)."""
  from lorajax._src.core.checkpoint import CheckpointManager  # noqa: PLC0415

  return CheckpointManager(directory, config, max_to_keep=2)


def latest_step(directory: pathlib.Path) -> int | None:
  """The newest checkpoint step in `directory`, or None."""
  from lorajax._src.core.checkpoint import CheckpointManager  # noqa: PLC0415

  steps = CheckpointManager.saved_steps(directory)
  return steps[-1] if steps else None


class MetricsError(ValueError):
  """A metrics.jsonl line that is not a JSON object (not a torn tail)."""


def read_metrics(
    path: pathlib.Path,
    *,
    warn: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
  """The records of a metrics JSONL file (missing file: empty list).

  A run killed while writing (or stopped by a full disk) can leave the last
  line cut short: that torn tail is dropped, with a warning. Any other line
  that is not a JSON object is corruption and raises.

  Args:
    path: The metrics.jsonl file.
    warn: Called with a message when a torn last line is dropped (default:
      `warnings.warn`).

  Returns:
    The records, in file order.

  Raises:
    MetricsError: (a ValueError) naming the file and line of a damaged line
      that is not the last one.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return []
  raw = path.read_bytes()
  # A power loss can also leave NUL bytes where the tail should be.
  lines = raw.rstrip(b"\0").decode("utf-8", errors="replace").split("\n")
  numbered = [(n, line) for n, line in enumerate(lines, start=1)
              if line.strip()]
  records = []
  for i, (n, line) in enumerate(numbered):
    try:
      rec = json.loads(line)
      if not isinstance(rec, dict):
        raise ValueError(f"a JSON {type(rec).__name__}, not an object")
    except ValueError as e:
      if i == len(numbered) - 1:
        msg = (f"{path}:{n}: dropping the torn last line ({len(line)}"
               " characters, not complete JSON), left by an interrupted"
               " write.")
        if warn is None:
          warnings.warn(msg, RuntimeWarning, stacklevel=2)
        else:
          warn(msg)
        break
      detail = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
      raise MetricsError(
          f"{path}:{n}: damaged line in the run's metrics ({detail}:"
          f" {line[:80]!r}). Only a torn last line is repaired"
          f" automatically; delete or fix line {n} (and any lines after it"
          " that are damaged too), then try again."
      ) from None
    records.append(rec)
  return records


def write_metrics(path: pathlib.Path, records: Iterable[dict]) -> None:
  """Rewrites a metrics JSONL file atomically."""
  def write(f):
    for r in records:
      f.write(json.dumps(r, default=_jsonable) + "\n")

  _write_atomic(path, write)


def plot_loss(records: Iterable[dict[str, Any]], path: str | os.PathLike,
              title: str = "LoRA fine-tuning") -> None:
  """Draws training loss per step (and eval loss points) into a PNG.

  Args:
    records: Metrics records: `{"step", "loss"}` for training steps, and
      `{"step", "eval_loss"}` for evaluations.
    path: The image file to write.
    title: Plot title.
  """
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  records = list(records)
  tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
  ev = [(r["step"], r["eval_loss"]) for r in records
        if r.get("eval_loss") is not None and np.isfinite(r["eval_loss"])]
  fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
  if tr:
    steps, losses = map(np.asarray, zip(*tr))
    ax.plot(steps, losses, label="train loss", lw=1.0, alpha=0.5)
    if len(losses) >= 10:  # Exponential moving average, for the trend.
      ema = np.empty_like(losses)
      ema[0] = losses[0]
      for i in range(1, len(losses)):
        ema[i] = 0.8 * ema[i - 1] + 0.2 * losses[i]
      ax.plot(steps, ema, label="train loss (EMA 0.8)", lw=1.8)
  if ev:
    ax.plot(*zip(*ev), "o", ms=7, label="held-out loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss per completion token")
  ax.set_yscale("log")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp.png")
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, path)
