"""The output directory of a fine-tuning run.

Layout (`DONE` marker written last, so a crashed run is never complete):

  config.json       the run's settings (checked again on `--resume`)
  metrics.jsonl     one JSON object per step, and per evaluation
  checkpoints/<N>/  orbax checkpoints: adapter, optimizer state, step, config
  adapter/          PEFT-format export (adapter_config.json + safetensors)
  merged/           optional merged full weights (safetensors)
  loss.png          the loss curve
  samples.json      held-out answers before vs after
  run.json          final summary; written last, marks the run complete
"""

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from lorajax._src import paths as paths_lib
from lorajax._src.adapter import LoraWeight

PyTree = Any

DONE_FILE = "run.json"


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
  """Writes JSON to a temp file in the same directory, then renames it."""
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
    f.write("\n")
  os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
  if isinstance(x, (np.generic,)):
    return x.item()
  if isinstance(x, pathlib.Path):
    return str(x)
  raise TypeError(f"not JSON serialisable: {type(x)}")


def replace_dir(tmp: pathlib.Path, final: pathlib.Path) -> None:
  """Moves a fully written `tmp` directory to `final` (replacing it)."""
  if final.exists():
    shutil.rmtree(final)
  os.replace(tmp, final)


def flatten_state(adapter: PyTree, opt_state: PyTree) -> dict[str, Any]:
  """A checkpointable dict of plain arrays, keyed by weight path.

  Adapter nodes become `{"<path>": {"a": ..., "b": ...}}`; optimizer state
  leaves are numbered in flattening order (their structure is rebuilt from a
  fresh `optimizer.init` on restore).
  """
  nodes = paths_lib.leaves_with_paths(
      adapter, is_leaf=lambda x: x is None or isinstance(x, LoraWeight))
  ad = {p: {"a": n.a, "b": n.b} for p, n in nodes if n is not None}
  opt = {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(opt_state))}
  return {"adapter": ad, "opt_state": opt}


def unflatten_state(flat: dict[str, Any], adapter_like: PyTree,
                    opt_like: PyTree) -> tuple[PyTree, PyTree]:
  """Inverse of `flatten_state`, given templates of the right structure.

  Raises:
    ValueError: Naming the weight paths whose shapes or presence differ.
  """
  is_node = lambda x: x is None or isinstance(x, LoraWeight)  # noqa: E731
  flat_nodes, treedef = jax.tree_util.tree_flatten_with_path(
      adapter_like, is_leaf=is_node)
  saved = flat["adapter"]
  errors = []
  new_nodes = []
  want = set()
  for kp, node in flat_nodes:
    if node is None:
      new_nodes.append(None)
      continue
    p = paths_lib.path_str(kp)
    want.add(p)
    got = saved.get(p)
    if got is None:
      errors.append(f"{p!r}: not in the checkpoint")
      new_nodes.append(node)
      continue
    a, b = np.asarray(got["a"]), np.asarray(got["b"])
    if a.shape != node.a.shape or b.shape != node.b.shape:
      errors.append(f"{p!r}: checkpoint a{a.shape} b{b.shape}, expected"
                    f" a{tuple(node.a.shape)} b{tuple(node.b.shape)}")
    new_nodes.append(LoraWeight(a=a.astype(node.a.dtype),
                                b=b.astype(node.b.dtype), scale=node.scale,
                                axes=node.axes, alpha=node.alpha))
  extra = sorted(set(saved) - want)
  errors.extend(f"{p!r}: in the checkpoint but not adapted by this config"
                for p in extra)
  if errors:
    raise ValueError(
        "The checkpoint does not fit this model and LoRA config:\n- "
        + "\n- ".join(errors[:12])
        + ("\n- ..." if len(errors) > 12 else "")
        + "\nResume with the settings the run was started with."
    )
  adapter = jax.tree_util.tree_unflatten(treedef, new_nodes)
  opt_leaves, opt_def = jax.tree.flatten(opt_like)
  saved_opt = flat["opt_state"]
  if len(saved_opt) != len(opt_leaves):
    raise ValueError(
        f"The checkpoint's optimizer state has {len(saved_opt)} arrays; this"
        f" optimizer has {len(opt_leaves)}. Resume with the same optimizer"
        " settings."
    )
  opt = [np.asarray(saved_opt[f"{i:05d}"]).astype(like.dtype)
         for i, like in enumerate(opt_leaves)]
  return adapter, jax.tree.unflatten(opt_def, opt)


def _manager(directory: pathlib.Path):
  import orbax.checkpoint as ocp  # noqa: PLC0415

  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory.resolve(), options=options)


def save_checkpoint(directory: pathlib.Path, step: int, adapter: PyTree,
                    opt_state: PyTree, metadata: dict[str, Any]) -> None:
  """Saves adapter + optimizer state + step + metadata with orbax."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  with _manager(directory) as mngr:
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flatten_state(adapter, opt_state)),
        meta=ocp.args.JsonSave(dict(metadata, step=step)),
    ))
    mngr.wait_until_finished()


def latest_step(directory: pathlib.Path) -> int | None:
  """The newest complete checkpoint step in `directory`, or None."""
  if not directory.is_dir():
    return None
  with _manager(directory) as mngr:
    return mngr.latest_step()


def restore_checkpoint(directory: pathlib.Path, step: int, adapter_like: PyTree,
                       opt_like: PyTree) -> tuple[PyTree, PyTree, dict]:
  """Restores `(adapter, opt_state, metadata)` saved by `save_checkpoint`."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  with _manager(directory) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  adapter, opt = unflatten_state(restored["state"], adapter_like, opt_like)
  return adapter, opt, dict(restored["meta"])


def read_metrics(path: pathlib.Path) -> list[dict[str, Any]]:
  """The records of a metrics JSONL file (missing file: empty list)."""
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines()
          if line.strip()]


def write_metrics(path: pathlib.Path, records: Iterable[dict]) -> None:
  """Rewrites a metrics JSONL file atomically."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "w") as f:
    for r in records:
      f.write(json.dumps(r, default=_jsonable) + "\n")
  os.replace(tmp, path)


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
    ax.plot(*zip(*tr), label="train loss", lw=1.2)
  if ev:
    ax.plot(*zip(*ev), "o--", label="held-out loss")
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
