"""Adapter checkpoints with orbax: async, keep-last-N, resharding, fall-back.

Saves are asynchronous and keep the last N steps; restores reshard onto any
mesh and fall back past corrupt or partial steps.

A step directory holds two orbax items: `state` (the adapter's `a`/`b`
arrays and the optimizer state's arrays, written by every process for its
own shards) and `meta` (JSON: the `LoraConfig`, the step, and the path,
axes, scale and shapes of every adapted weight). `LoraWeight`'s static
fields are not arrays, so they live in `meta` and in the template you
restore into.
"""

import atexit
import dataclasses
import math
import os
import threading
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from lorajax._src.core import paths as paths_lib
from lorajax._src.core.adapter import LoraWeight, VeraWeight
from lorajax._src.core.adapter import is_node as _is_node
from lorajax._src.core.config import LoraConfig
from lorajax._src.core.methods import VeraConfig
from lorajax._src.core.typing import PyTree

_FORMAT = "lorajax-checkpoint"
_VERSION = 1


def _adapter_nodes(adapter: PyTree, what: str) -> list[tuple[str, LoraWeight]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=_is_node)
  nodes = [(paths_lib.path_str(p), n) for p, n in flat if n is not None]
  for path, n in nodes:
    if not isinstance(n, LoraWeight | VeraWeight):
      raise TypeError(
          f"`{what}` must be an adapter pytree (LoraWeight, VeraWeight or"
          " None nodes, as `lorajax.init` makes); at"
          f" {path!r} it holds {type(n).__name__}."
      )
    for name in _node_arrays(n):
      x = getattr(n, name)
      if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(
            f"`{what}` at {path!r}: `{name}` must be an array or a"
            f" jax.ShapeDtypeStruct; got {type(x).__name__}."
        )
  if not nodes:
    raise ValueError(f"`{what}` holds no LoraWeight node.")
  return nodes


def _node_arrays(n: Any) -> tuple[str, ...]:
  """Names of a node's array children (DoRA adds `magnitude`)."""
  if isinstance(n, VeraWeight):
    return ("lambda_d", "lambda_b", "a", "b")
  return ("a", "b") if n.magnitude is None else ("a", "b", "magnitude")


def _weight_meta(path: str, n: LoraWeight) -> dict[str, Any]:
  meta = {
      "path": path, "axes": n.axes, "scale": n.scale,
      "alpha": getattr(n, "alpha", None),
      "rslora": getattr(n, "rslora", False),
      "a": list(n.a.shape), "b": list(n.b.shape),
      "dtype": np.dtype(n.a.dtype).name,
  }
  if n.method != "lora":  # Plain LoRA entries stay as they were.
    meta["method"] = n.method
  return meta


def _leaf_meta(tree: PyTree) -> list[dict[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [
      {"path": jax.tree_util.keystr(p), "shape": list(np.shape(x)),
       "dtype": np.dtype(x.dtype).name}
      for p, x in flat
  ]


def _arrays(adapter: PyTree, opt_state: PyTree | None) -> dict[str, Any]:
  nodes = _adapter_nodes(adapter, "adapter")
  state: dict[str, Any] = {
      "adapter": {str(i): {k: getattr(n, k) for k in _node_arrays(n)}
                  for i, (_, n) in enumerate(nodes)},
  }
  if opt_state is not None:
    leaves = jax.tree.leaves(opt_state)
    if leaves:
      state["opt_state"] = {str(i): x for i, x in enumerate(leaves)}
  return state


_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _bits_sum(x: jax.Array) -> jax.Array:
  """Sum of the array's bit patterns mod 2**32: exact in any order, so the
  same on every mesh."""
  if x.dtype == jnp.bool_:
    return jnp.sum(x.astype(jnp.uint32), dtype=jnp.uint32)
  size = np.dtype(x.dtype).itemsize
  if size == 8:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
  else:
    bits = jax.lax.bitcast_convert_type(x, _UINT[size])
  return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)


def _checksums(leaves: list[jax.Array]) -> list[int]:
  """One checksum per array, computed where the arrays live."""
  if not leaves:
    return []
  kw: dict[str, Any] = {}
  mesh = next((getattr(x.sharding, "mesh", None) for x in leaves
               if isinstance(getattr(x, "sharding", None), NamedSharding)),
              None)
  if mesh is not None:
    kw["out_shardings"] = NamedSharding(mesh, PartitionSpec())
  fn = jax.jit(lambda xs: jnp.stack([_bits_sum(x) for x in xs]), **kw)
  out = fn([jnp.asarray(x) if not isinstance(x, jax.Array) else x
            for x in leaves])
  return [int(v) for v in np.asarray(out.addressable_data(0))]


def _flat_names(arrays: dict[str, Any]) -> list[str]:
  flat, _ = jax.tree_util.tree_flatten_with_path(arrays)
  return ["/".join(str(k.key) for k in p) for p, _ in flat]


def _dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      total += os.path.getsize(os.path.join(root, f))
  return total


def _abstract_leaf(x: Any, path: str) -> jax.ShapeDtypeStruct:
  sharding = getattr(x, "sharding", None)
  if sharding is None:
    sharding = SingleDeviceSharding(jax.local_devices()[0])
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(
        f"The restore template at {path} must be an array or a"
        f" jax.ShapeDtypeStruct; got {type(x).__name__}."
    )
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


class CorruptCheckpointError(ValueError):
  """A checkpoint step that cannot be read (interrupted save, bad files)."""


class CheckpointManager:
  """Saves and restores LoRA training state with orbax.

  Wraps `orbax.checkpoint.CheckpointManager`: saves are asynchronous (the
  training loop continues while files are written), only the last
  `max_to_keep` steps are kept, and every process of a multi-process run
  writes only its own shards (call `save` and `restore` on every process).
  Pending saves are finished by `wait_until_finished`, `close`, leaving a
  `with` block, and at interpreter exit.

  Example:
    >>> with lorajax.CheckpointManager(path, config, max_to_keep=3) as mgr:
    ...   for step in range(n):
    ...     adapter, opt_state, metrics = train.step(params, adapter,
    ...                                              opt_state, batch)
    ...     mgr.save(step + 1, adapter, opt_state)
    >>> # later, on any mesh: templates give shapes and target shardings
    >>> adapter, opt_state, step = mgr.restore(adapter=adapter0,
    ...                                        opt_state=opt_state0)

  Args:
    directory: Where the step directories go (created by the first `save`;
      queries and restores never create it).
    config: The `LoraConfig` stored with every save (as JSON).
    max_to_keep: How many of the newest steps to keep (`None`: all).
    save_interval_steps: Save only steps divisible by this (others are
      skipped; `save(..., force=True)` saves anyway).
    async_save: Write in a background thread (`False`: `save` blocks).
  """

  def __init__(
      self,
      directory: str | os.PathLike,
      config: LoraConfig,
      *,
      max_to_keep: int | None = 3,
      save_interval_steps: int = 1,
      async_save: bool = True,
  ):
    if not isinstance(config, LoraConfig | VeraConfig):
      raise TypeError(
          f"`config` must be a LoraConfig or VeraConfig; got {type(config)}.")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(
          f"`max_to_keep` must be >= 1 or None; got {max_to_keep}."
      )
    self.directory = os.path.abspath(os.fspath(directory))
    self.config = config
    self._bad_steps: set[int] = set()
    self._mgr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            # Created by the first `save`: a restore or query on a mistyped
            # directory must not leave an empty directory behind.
            create=False,
        ),
        item_names=("state", "meta"),
    )
    ref = weakref.ref(self)

    def finish_at_exit() -> None:
      if (m := ref()) is not None:
        m.close()

    self._atexit = finish_at_exit
    # Finish pending saves at exit. This must run before Python's thread
    # pools refuse new work (they stop at the threading-shutdown hooks, which
    # run before `atexit`), so it is registered as such a hook where the
    # interpreter has the (stdlib-internal) registry, else with `atexit`.
    register = getattr(threading, "_register_atexit", atexit.register)
    register(self._atexit)

  # Lifecycle.
  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def wait_until_finished(self) -> None:
    """Blocks until every pending asynchronous save is on disk."""
    self._mgr.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases orbax's resources."""
    if self._mgr is not None:
      self._mgr.wait_until_finished()
      self._mgr.close()
      self._mgr = None

  def _live(self) -> ocp.CheckpointManager:
    if self._mgr is None:
      raise ValueError(
          f"The CheckpointManager for {self.directory!r} is closed; make a"
          " new one."
      )
    return self._mgr

  # Queries.
  @staticmethod
  def saved_steps(directory: str | os.PathLike) -> list[int]:
    """The finished saves in `directory`, oldest first, without a manager.

    Reads the directory only (no `LoraConfig` needed, nothing written), e.g.
    to decide whether a run can resume.

    Args:
      directory: A checkpoint directory (missing: no steps).

    Returns:
      The saved steps, oldest first.
    """
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
      return []
    mgr = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True),
        item_names=("state", "meta"))
    try:
      return sorted(mgr.all_steps())
    finally:
      mgr.close()

  def all_steps(self) -> list[int]:
    """The saved steps (finished saves only), oldest first."""
    return sorted(self._live().all_steps())

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> str:
    """The directory of one step."""
    return os.path.join(self.directory, str(step))

  def nbytes(self, step: int | None = None) -> int:
    """Bytes on disk of one step (default: the newest)."""
    self.wait_until_finished()
    step = self._step_or_latest(step)
    return _dir_bytes(self.step_dir(step))

  def metadata(self, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata saved with a step (default: the newest).

    Raises:
      CorruptCheckpointError: If it cannot be read.
    """
    step = self._step_or_latest(step)
    try:
      meta = self._live().restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
      ).meta
    except Exception as e:  # orbax/tensorstore/json errors vary by backend.
      raise CorruptCheckpointError(
          f"Checkpoint step {step} in {self.directory!r} has no readable"
          f" metadata ({type(e).__name__}: {e})."
      ) from e
    if not isinstance(meta, Mapping) or meta.get("format") != _FORMAT:
      raise CorruptCheckpointError(
          f"Checkpoint step {step} in {self.directory!r} is not a lorajax"
          f" checkpoint (metadata {meta!r:.200})."
      )
    return dict(meta)

  def saved_config(self, step: int | None = None
                   ) -> LoraConfig | VeraConfig:
    """The `LoraConfig` saved with a step (default: the newest)."""
    d = self.metadata(step)["config"]
    if d.get("method") == "vera":
      return VeraConfig.from_dict(d)
    return LoraConfig.from_dict(d)

  def _step_or_latest(self, step: int | None) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"No checkpoint in {self.directory!r}.")
    return step

  # Save.
  def save(
      self,
      step: int,
      adapter: PyTree,
      opt_state: PyTree | None = None,
      *,
      metadata: Mapping[str, Any] | None = None,
      force: bool = False,
  ) -> bool:
    """Starts saving the adapter (and optimizer state) as `step`.

    Returns at once with asynchronous saves; the arrays are copied to host
    memory first, so the caller may donate or overwrite them right away.

    Args:
      step: The training step (a non-negative int).
      adapter: The adapter pytree.
      opt_state: The optimizer state, or None.
      metadata: Extra JSON-serialisable data to store (e.g. data-loader
        position).
      force: Save even if `save_interval_steps` would skip this step.

    Returns:
      Whether a save was started.

    Raises:
      ValueError: If `step` already exists as a good checkpoint.
    """
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or (
        step < 0):
      raise ValueError(f"`step` must be a non-negative int; got {step!r}.")
    step = int(step)
    mgr = self._live()
    if step in self._bad_steps and step in mgr.all_steps():
      # Found corrupt by `restore`: replace it.
      mgr.delete(step)
      self._bad_steps.discard(step)
    elif step in mgr.all_steps():
      raise ValueError(
          f"Checkpoint step {step} already exists in {self.directory!r}."
          " Save under a new step number or delete that step directory."
      )
    nodes = _adapter_nodes(adapter, "adapter")
    arrays = _arrays(adapter, opt_state)
    os.makedirs(self.directory, exist_ok=True)
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "step": step,
        "config": self.config.to_dict(),
        "weights": [_weight_meta(p, n) for p, n in nodes],
        "opt_state": None if opt_state is None else _leaf_meta(opt_state),
        "adapter_bytes": int(sum(
            math.prod(getattr(n, k).shape)
            * np.dtype(getattr(n, k).dtype).itemsize
            for _, n in nodes for k in _node_arrays(n))),
        "user": dict(metadata or {}),
        "checksums": dict(zip(
            _flat_names(arrays),
            _checksums(jax.tree.leaves(arrays)))),
    }
    return mgr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(arrays),
            meta=ocp.args.JsonSave(meta),
        ),
        force=force,
    )

  # Restore.
  def _check_fit(self, meta, step, adapter, opt_state):
    nodes = _adapter_nodes(adapter, "adapter")
    saved = {w["path"]: w for w in meta["weights"]}
    have = {p for p, _ in nodes}
    errors = []
    for p in [w["path"] for w in meta["weights"] if w["path"] not in have]:
      errors.append(f"{p!r} is in the checkpoint but not in the template.")
    for p in [p for p, _ in nodes if p not in saved]:
      errors.append(f"{p!r} is in the template but not in the checkpoint.")
    for p, n in nodes:
      w = saved.get(p)
      if w is None:
        continue
      if tuple(w["a"]) != tuple(n.a.shape) or tuple(w["b"]) != tuple(
          n.b.shape):
        errors.append(
            f"{p!r}: the checkpoint has a{tuple(w['a'])} b{tuple(w['b'])}"
            f" (rank {w['a'][-1]}), the template a{tuple(n.a.shape)}"
            f" b{tuple(n.b.shape)} (rank {n.rank})."
        )
      elif w.get("method", "lora") != n.method:
        errors.append(
            f"{p!r}: the checkpoint holds a {w.get('method', 'lora')!r}"
            f" adapter, the template a {n.method!r} one; build the template"
            " with the config the checkpoint records"
            " (`CheckpointManager.saved_config`).")
      elif w["axes"] != n.axes:
        errors.append(
            f"{p!r}: the checkpoint has axes {w['axes']!r}, the template"
            f" {n.axes!r}."
        )
      elif not math.isclose(w["scale"], n.scale, rel_tol=1e-12):
        errors.append(
            f"{p!r}: the checkpoint has scale {w['scale']} (alpha"
            f" {w['alpha']}), the template {n.scale} (alpha"
            f" {getattr(n, 'alpha', None)})."
        )
    if opt_state is not None:
      if meta["opt_state"] is None:
        errors.append("`opt_state` was given but the checkpoint has none.")
      else:
        want = _leaf_meta(opt_state)
        got = meta["opt_state"]
        if len(want) != len(got):
          errors.append(
              f"the optimizer state has {len(got)} arrays in the checkpoint"
              f" and {len(want)} in the template (a different optimizer?)."
          )
        else:
          for w, g in zip(want, got):
            if w["shape"] != g["shape"] or w["dtype"] != g["dtype"]:
              errors.append(
                  f"optimizer state {w['path']}: the checkpoint has"
                  f" {g['dtype']}{tuple(g['shape'])}, the template"
                  f" {w['dtype']}{tuple(w['shape'])}."
              )
    if errors:
      raise ValueError(
          f"Checkpoint step {step} in {self.directory!r} does not fit the"
          " restore template:\n- " + "\n- ".join(errors)
          + f"\nIt was saved with {meta['config']!r}. Build the template"
          " from that config (`mgr.saved_config()`), with"
          " `lorajax.init_sharded` or `lorajax.init` under `jax.eval_shape`."
      )

  def _verify(self, meta, step, state, nodes):
    want = meta.get("checksums") or {}
    names = _flat_names(state)
    got = _checksums(jax.tree.leaves(state))
    bad = []
    for name, g in zip(names, got):
      if name in want and want[name] != g:
        parts = name.split("/")
        if parts[0] == "adapter":
          bad.append(f"{nodes[int(parts[1])][0]!r}.{parts[2]}")
        else:
          bad.append(f"optimizer state leaf {parts[1]}")
    if bad:
      raise CorruptCheckpointError(
          f"Checkpoint step {step} in {self.directory!r} has arrays whose"
          f" contents differ from what was saved (checksum mismatch):"
          f" {', '.join(bad)}."
      )

  def _restore_step(self, step, adapter, opt_state):
    meta = self.metadata(step)
    self._check_fit(meta, step, adapter, opt_state)
    nodes = _adapter_nodes(adapter, "adapter")
    target: dict[str, Any] = {"adapter": {
        str(i): {k: _abstract_leaf(getattr(n, k), f"{p!r}.{k}")
                 for k in _node_arrays(n)}
        for i, (p, n) in enumerate(nodes)}}
    if meta["opt_state"] and opt_state is not None:
      flat, _ = jax.tree_util.tree_flatten_with_path(opt_state)
      target["opt_state"] = {
          str(i): _abstract_leaf(x, jax.tree_util.keystr(p))
          for i, (p, x) in enumerate(flat)}
    try:
      state = self._live().restore(
          step,
          args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
              item=target,
              restore_args=jax.tree.map(
                  lambda x: ocp.ArrayRestoreArgs(
                      sharding=x.sharding, global_shape=x.shape,
                      dtype=x.dtype),
                  target),
              partial_restore=True,
          )),
      ).state
    except Exception as e:  # tensorstore/orbax errors vary by backend.
      raise CorruptCheckpointError(
          f"Checkpoint step {step} in {self.directory!r} cannot be read"
          f" ({type(e).__name__}: {str(e)[:500]})."
      ) from e
    self._verify(meta, step, state, nodes)
    flat_nodes, a_def = jax.tree_util.tree_flatten(adapter, is_leaf=_is_node)
    out, it = [], iter(range(len(nodes)))
    for n in flat_nodes:
      if n is None:
        out.append(None)
        continue
      arrs = state["adapter"][str(next(it))]
      out.append(dataclasses.replace(n, **{k: arrs[k]
                                           for k in _node_arrays(n)}))
    new_adapter = jax.tree_util.tree_unflatten(a_def, out)
    new_opt = None
    if opt_state is not None:
      leaves, o_def = jax.tree.flatten(opt_state)
      ost = state.get("opt_state", {})
      new_opt = jax.tree.unflatten(
          o_def, [ost[str(i)] for i in range(len(leaves))])
    return new_adapter, new_opt

  def restore(
      self,
      step: int | None = None,
      *,
      adapter: PyTree,
      opt_state: PyTree | None = None,
  ) -> tuple[PyTree, PyTree | None, int]:
    """Restores a step onto the template's shapes and shardings.

    The templates fix the structure, the static `LoraWeight` fields (scale,
    axes, alpha) and where every array goes: each leaf is a `jax.Array`
    (its sharding is used) or a `jax.ShapeDtypeStruct` with a `sharding`.
    A template on another mesh than the one saved from reshards on load.
    `lorajax.init_sharded(params, config, ...)` and the train step's
    `init` make suitable templates.

    With `step=None` the newest step is restored; if it cannot be read (an
    interrupted save, a truncated or missing file), a warning names it and
    the next older step is tried. A named `step` that cannot be read
    raises.

    Args:
      step: The step to restore, or None for the newest good one.
      adapter: The adapter template.
      opt_state: The optimizer state template, or None to skip it.

    Returns:
      `(adapter, opt_state, step)`; `opt_state` is None if not asked for.

    Raises:
      FileNotFoundError: If there is no checkpoint (or no readable one).
      ValueError: If the checkpoint does not fit the template (naming each
        weight path that differs).
      CorruptCheckpointError: If a named `step` cannot be read.
    """
    if step is not None:
      if step not in self.all_steps():
        raise FileNotFoundError(
            f"No checkpoint step {step} in {self.directory!r}; saved steps:"
            f" {self.all_steps()}."
        )
      return (*self._restore_step(step, adapter, opt_state), step)
    steps = self.all_steps()
    if not steps:
      if not os.path.isdir(self.directory):
        raise FileNotFoundError(
            f"No checkpoint directory {self.directory!r} (it does not exist;"
            " check the path)."
        )
      raise FileNotFoundError(f"No checkpoint in {self.directory!r}.")
    bad = []
    for s in reversed(steps):
      try:
        out = self._restore_step(s, adapter, opt_state)
      except CorruptCheckpointError as e:
        bad.append(s)
        self._bad_steps.add(s)
        warnings.warn(
            f"Skipping corrupt checkpoint step {s}: {e} Trying an older"
            " step.", RuntimeWarning, stacklevel=2,
        )
        continue
      return (*out, s)
    raise FileNotFoundError(
        f"No readable checkpoint in {self.directory!r}; corrupt steps: {bad}."
    )
