"""`lorajax plan`: will a LoRA run fit on a TPU slice, and how fast is it?

The plan builds the model's params, the adapter, the optimizer state and a
batch as `jax.ShapeDtypeStruct`s (no weights are read or allocated), derives
their shardings on the requested mesh, and ahead-of-time compiles the real
lorajax train step for the requested devices: a TPU topology that need not be
attached (`jax.experimental.topologies.get_topology_desc`, which needs the
`libtpu` wheel) or the local devices. From the compiled program it reports
the compiler's per-chip memory (`memory_analysis`) against the chip's HBM,
its cost model (`cost_analysis`: FLOPs, bytes, estimated seconds), the
collectives in the optimised HLO with their sizes, and the compile time. All
numbers are compiler estimates, not measurements on hardware.
"""

import dataclasses
import json
import math
import os
import pathlib
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lorajax._src.core import adapter as adapter_lib
from lorajax._src.core import paths as paths_lib
from lorajax._src.core import sharding as sharding_lib
from lorajax._src.core import train as train_lib
from lorajax._src.core.config import LoraConfig
from lorajax._src.core.precision import precision_policy
from lorajax._src.models import llama as llama_lib

PyTree = Any
GiB = 1024 ** 3

MODES = ("factored", "merged", "full")
PRECISIONS = ("bf16", "f32")
REMATS = ("none", "full", "dots", "projections")
MESH_AXES = ("data", "fsdp", "tensor")


class PlanError(ValueError):
  """A plan's inputs are invalid (unknown preset or topology, bad mesh...)."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-chip figures (Cloud TPU specs).

  Attributes:
    name: Short chip name (`v5p`).
    hbm_bytes: HBM per chip.
    peak_flops: Peak bf16 FLOP/s per chip.
    hbm_bandwidth: HBM bytes/s per chip.
  """

  name: str
  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float = float("nan")


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1228e9),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9),
}
"""The TPU chips `plan` knows: HBM, peak bf16 FLOP/s, HBM bandwidth."""
# `device_kind` strings of the TPU runtime, for devices given directly.
_KINDS = {"tpu v4": "v4", "tpu v5 lite": "v5e", "tpu v5e": "v5e",
          "tpu v5": "v5p", "tpu v5p": "v5p", "tpu v6 lite": "v6e",
          "tpu v6e": "v6e"}

_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-3.1-70b": dict(
        model_type="llama", vocab_size=128256, hidden_size=8192,
        intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2.5-7b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584,
        intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
        max_position_embeddings=131072, rms_norm_eps=1e-6,
        tie_word_embeddings=False),
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
        max_position_embeddings=8192, rms_norm_eps=1e-5,
        tie_word_embeddings=True),
}
"""Hugging Face `config.json` dicts of the models `plan` knows by name."""


# ---------------------------------------------------------------------------
# Inputs: model, devices, mesh.


def model_config_dict(model: str | os.PathLike | Mapping[str, Any]
                      ) -> tuple[str, dict[str, Any]]:
  """`(name, Hugging Face config dict)` for a preset, file or directory.

  Args:
    model: A preset name (see `PRESETS`), a `config.json` path, a checkpoint
      directory holding `config.json`, or a config dict.

  Returns:
    A display name and the config dict.

  Raises:
    PlanError: If the preset is unknown or the file is missing or invalid.
  """
  if isinstance(model, Mapping):
    return str(model.get("_name_or_path", "config")), dict(model)
  name = os.fspath(model)
  if name.lower() in PRESETS:
    return name.lower(), dict(PRESETS[name.lower()])
  p = pathlib.Path(name).expanduser()
  if p.is_dir():
    p = p / "config.json"
  if not p.is_file():
    raise PlanError(
        f"--model {name!r} is neither a preset nor an existing config.json"
        f" or checkpoint directory. Presets: {', '.join(sorted(PRESETS))};"
        " or pass a Hugging Face config.json file, or a directory that"
        " holds one."
    )
  try:
    d = json.loads(p.read_text())
  except (OSError, ValueError) as e:
    raise PlanError(f"Could not read {str(p)!r} as JSON: {e}.") from None
  if not isinstance(d, dict):
    raise PlanError(f"{str(p)!r} must hold a JSON object (a config.json).")
  missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                         "num_hidden_layers", "num_attention_heads")
             if k not in d]
  if missing:
    raise PlanError(
        f"{str(p)!r} lacks {', '.join(missing)}: it is not a Llama-family"
        " Hugging Face config.json."
    )
  return str(p), d


def parse_mesh(spec: str | Mapping[str, int]) -> dict[str, int]:
  """Parses `"data=2,fsdp=4"` into `{"data": 2, "fsdp": 4}`.

  Args:
    spec: The mesh string (or a dict, returned checked).

  Returns:
    The axis sizes in the given order.

  Raises:
    PlanError: On an unknown axis name, a repeated axis or a bad size.
  """
  if isinstance(spec, Mapping):
    items = list(spec.items())
  else:
    items = []
    for raw in str(spec).split(","):
      part = raw.strip()
      m = re.fullmatch(r"([A-Za-z_]\w*)\s*=\s*(\d+)", part)
      if not m:
        raise PlanError(
            f"--mesh {spec!r}: {part!r} is not NAME=SIZE. Write the mesh as"
            " comma-separated axes, e.g. 'fsdp=8' or 'data=2,fsdp=4' or"
            " 'fsdp=16,tensor=4'."
        )
      items.append((m.group(1), int(m.group(2))))
  out: dict[str, int] = {}
  for name, size in items:
    if name not in MESH_AXES:
      raise PlanError(
          f"--mesh axis {name!r} is unknown; use {', '.join(MESH_AXES)}"
          " (data: batch only; fsdp: batch and weights; tensor: weights'"
          " head/FFN axes)."
      )
    if name in out:
      raise PlanError(f"--mesh names axis {name!r} twice.")
    if int(size) < 1:
      raise PlanError(f"--mesh axis {name!r} has size {size}; must be >= 1.")
    out[name] = int(size)
  if not out:
    raise PlanError("--mesh is empty; e.g. 'fsdp=8'.")
  return out


def _tpu_devices(topology: str):
  try:
    from jax.experimental import topologies  # noqa: PLC0415
  except ImportError as e:  # pragma: no cover
    raise PlanError(
        f"jax.experimental.topologies is unavailable: {e}") from e
  if not re.fullmatch(r"v[0-9][a-z]*:\d+(x\d+)+", topology):
    raise PlanError(
        f"--topology {topology!r} is not a TPU topology name such as"
        " 'v5p:2x2x2', 'v6e:2x4', 'v5e:2x2' or 'v4:2x2x1' (chip:shape), nor"
        " 'local' (this machine's devices)."
    )
  chip = topology.split(":", maxsplit=1)[0]
  if chip not in CHIPS:
    raise PlanError(
        f"--topology {topology!r}: unknown TPU generation {chip!r}; known:"
        f" {', '.join(CHIPS)}."
    )
  try:
    import libtpu  # noqa: F401, PLC0415
  except ImportError:
    raise PlanError(
        f"--topology {topology!r} needs the `libtpu` wheel, which holds the"
        " TPU compiler (it also compiles for slices that are not attached)."
        ' Install it with `pip install "lorajax[tpu]"` (the same as `pip'
        ' install "jax[tpu]"` for your jax version), or plan for the local'
        " devices with --topology local."
    ) from None
  # libtpu takes a machine-wide lock file unless told that several
  # processes may load it; compiling for a detached topology needs no lock.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(topology_name=topology,
                                        platform="tpu")
  except Exception as e:  # noqa: BLE001
    raise PlanError(
        f"--topology {topology!r} was rejected by the TPU compiler:"
        f" {' '.join(str(e).split())[:300]}. Check the shape: v4/v5p slices"
        " are 3-D (e.g. v5p:2x2x2, v5p:4x4x4), v5e/v6e slices 2-D (v5e:2x2,"
        " v6e:2x4, v6e:4x4)."
    ) from None
  return list(desc.devices), CHIPS[chip]


def _local_devices():
  devices = jax.devices()
  kind = devices[0].device_kind.lower()
  chip = CHIPS.get(_KINDS.get(kind, ""))
  if chip is not None:
    return devices, chip
  hbm = None
  try:
    stats = devices[0].memory_stats() or {}
    hbm = stats.get("bytes_limit")
  except Exception:  # noqa: BLE001
    hbm = None
  if hbm is None and devices[0].platform == "cpu":
    try:
      total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
      hbm = total // len(devices)  # Simulated CPU devices share the RAM.
    except (ValueError, OSError, AttributeError):
      hbm = None
  return devices, Chip(devices[0].device_kind, int(hbm or 0), float("nan"))


def devices_for(topology: str):
  """`(devices, Chip)` for a TPU topology name or `"local"`.

  Raises:
    PlanError: For an unknown topology or a missing libtpu.
  """
  if topology in ("local", "cpu", "gpu"):
    return _local_devices()
  return _tpu_devices(topology)


# ---------------------------------------------------------------------------
# Shardings of the Llama weights.

# (regex on the path, spec entries of the last axes); leading (stacked
# layer) axes are replicated. FSDP shards each matrix's model-width axis,
# tensor parallelism its heads/FFN axis (Megatron: column-parallel q/k/v,
# gate, up; row-parallel o, down).
_RULES = (
    (r".*/(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel", ("fsdp", "tensor")),
    (r".*/(q_proj|k_proj|v_proj)/bias", ("tensor",)),
    (r".*/(o_proj|down_proj)/kernel", ("tensor", "fsdp")),
    (r".*embed_tokens/(embedding|weight)", ("tensor", "fsdp")),
    (r"lm_head/kernel", ("fsdp", "tensor")),
)


def param_specs(abstract_params: PyTree, mesh_axes: Mapping[str, int]
                ) -> tuple[PyTree, list[str]]:
  """PartitionSpecs for the Llama params on a mesh, plus notes.

  An axis whose size the mesh axis does not divide is left replicated (and
  noted).
  """
  notes = []

  def one(keypath, x):
    path = paths_lib.path_str(keypath)
    for rx, entries in _RULES:  # noqa: B007 (used after the loop)
      if re.fullmatch(rx, path):
        break
    else:
      return PartitionSpec()
    lead = x.ndim - len(entries)
    out = [None] * lead
    for dim, name in zip(x.shape[lead:], entries):
      size = mesh_axes.get(name, 1)
      if size == 1:
        out.append(None)
      elif dim % size:
        notes.append(f"{path}: axis of size {dim} not divisible by"
                     f" {name}={size}; replicated along it")
        out.append(None)
      else:
        out.append(name)
    return PartitionSpec(*out)

  return jax.tree_util.tree_map_with_path(one, abstract_params), notes


def _per_chip_bytes(x: jax.ShapeDtypeStruct, spec: PartitionSpec,
                    mesh_axes: Mapping[str, int]) -> int:
  n = 1
  for e in spec:
    for name in (e if isinstance(e, tuple) else (e,)):
      if name is not None:
        n *= mesh_axes[name]
  return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize // n


# ---------------------------------------------------------------------------
# Model FLOPs (FACTS.md: what the step really computes).


def model_flops_per_token(config: Any, lora_plan: Mapping[str, Any],
                          abstract_params: PyTree, mode: str,
                          seq_len: int) -> float:
  """Useful FLOPs per trained token of one train step.

  Per `d_in x d_out` matrix and token: forward `2 d_in d_out`; the input
  gradient another `2 d_in d_out`; full fine-tuning adds the weight gradient
  `2 d_in d_out`. A LoRA-adapted matrix adds `2 r (d_in + d_out)` for each of
  the adapter's forward, input gradient and weight gradient. Attention
  (scores and values) counts `12 * layers * seq * heads * head_dim`
  (forward + backward, no causal saving). Embedding lookups count 0; a
  tied output head counts as a frozen (or, fully fine-tuned, trained)
  `hidden x vocab` matrix.
  """
  total = 0.0
  for keypath, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    path = paths_lib.path_str(keypath)
    if not path.endswith("kernel") or x.ndim < 2:
      continue
    layers = math.prod(x.shape[:-2])
    d_in, d_out = x.shape[-2], x.shape[-1]
    dense = 6 if mode == "full" else 4
    total += layers * dense * d_in * d_out
    plan = lora_plan.get(path)
    if plan is not None and mode != "full":
      total += layers * 6 * plan.rank * (d_in + d_out)
  c = config
  if c.tie_word_embeddings:  # The embedding table is also the output head.
    total += (6 if mode == "full" else 4) * c.hidden_size * c.vocab_size
  total += 12 * c.num_hidden_layers * seq_len * (
      c.num_attention_heads * c.head_dim)
  return float(total)


# ---------------------------------------------------------------------------
# Compiled-HLO collectives.

_DT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
             "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
             "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                "collective-permute")
_OP_RE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+"
    r"(?P<op>all-gather|reduce-scatter|all-reduce|all-to-all|"
    r"collective-permute)(?P<start>-start)?\(")
_SHAPE_RE = re.compile(r"([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_COMP_RE = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_WHILE_RE = re.compile(
    r"\swhile\(.*condition=%?([\w.\-]+).*body=%?([\w.\-]+)")
_TRIP_RE = re.compile(r'known_trip_count[^0-9]*"?n"?\s*:\s*"?(\d+)')
_CONST_RE = re.compile(r"=\s*s32\[\]\S*\s+constant\((\d+)\)")


def _shape_bytes(shape: str, kind: str, start: bool) -> int:
  shapes = [(dt, dims) for dt, dims in _SHAPE_RE.findall(shape)
            if dt in _DT_BYTES]
  if not shapes:
    return 0
  if start and kind in ("all-gather", "collective-permute"):
    # Their async starts return (operands, results[, u32 contexts]).
    shapes = [x for x in shapes if x[1]] or shapes
    if len(shapes) > 1:
      shapes = shapes[len(shapes) // 2:]
  return sum(_DT_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
             for dt, dims in shapes)


def collectives(hlo_text: str) -> list[dict[str, Any]]:
  """The collectives of a compiled (optimised) HLO module.

  Returns one entry per collective kind: `kind`, `count` (ops executed per
  step, counting ops in a loop body once per iteration when the compiler
  knows the trip count), `bytes` (per chip and step, the sum of the ops'
  result sizes) and `static_count` (ops in the program text).
  """
  # Split the module into computations.
  comps: dict[str, list[str]] = {}
  comp = None
  for line in hlo_text.splitlines():
    c = _COMP_RE.match(line)
    if c and not re.match(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=", line):
      comp = c.group(1)
      comps[comp] = []
    elif comp is not None:
      comps[comp].append(line)
  # Which computation is a loop body, and how often it runs: the compiler's
  # known trip count, else the bound the loop condition compares with.
  body_trips: dict[str, int] = {}
  for lines in comps.values():
    for line in lines:
      m = _WHILE_RE.search(line)
      if not m:
        continue
      t = _TRIP_RE.search(line)
      if t:
        trips = int(t.group(1))
      else:
        bounds = [int(x) for line in comps.get(m.group(1), [])
                  for x in _CONST_RE.findall(line)]
        trips = max(bounds) if bounds else 1
      body_trips[m.group(2)] = max(1, trips)
  stats: dict[str, dict[str, Any]] = {}
  for comp, lines in comps.items():
    reps = body_trips.get(comp, 1)
    for line in lines:
      m = _OP_RE.match(line)
      if not m:
        continue
      kind = m.group("op")
      nbytes = _shape_bytes(m.group("shape"), kind, bool(m.group("start")))
      s = stats.setdefault(kind, {"kind": kind, "count": 0, "bytes": 0,
                                  "static_count": 0})
      s["count"] += reps
      s["bytes"] += reps * nbytes
      s["static_count"] += 1
  return [stats[k] for k in _COLLECTIVES if k in stats]


# ---------------------------------------------------------------------------
# The plan.


@dataclasses.dataclass(frozen=True)
class PlanReport:
  """What `plan` found. All figures are compiler estimates per chip.

  Attributes:
    model: The model's name or config path.
    topology: The topology name (or `local`).
    chip: Chip name.
    chips: Number of chips.
    mesh: Mesh axis sizes.
    mode: `factored`, `merged` or `full`.
    precision: `bf16` or `f32`.
    remat: Remat policy.
    batch_size: Global batch (sequences).
    seq_len: Sequence length.
    rank: LoRA rank (0 for full fine-tuning).
    fits: Whether the per-chip total fits the chip's HBM.
    hbm_per_chip_bytes: Arguments + outputs - aliased + temporaries +
      generated code, per chip.
    hbm_capacity_bytes: The chip's HBM.
    argument_bytes: Per-chip argument bytes (params, adapter, optimizer
      state, batch).
    output_bytes: Per-chip output bytes.
    alias_bytes: Outputs that reuse (donated) argument buffers.
    temp_bytes: Per-chip temporaries (activations, gradients, buffers).
    breakdown: Per-chip bytes of the named consumers, largest first.
    step_seconds_estimate: The estimated step time: the compiler's cost
      model (`optimal_seconds`), else a roofline of its FLOP and byte
      counts against the chip's peak and HBM bandwidth; on local devices
      without a known peak, the step is run and timed.
    step_seconds_source: Which of those it is.
    tokens_per_second_estimate: `batch * seq / step_seconds_estimate`.
    mfu_estimate: Model-FLOPs utilisation from `model_flops` (None without
      a known peak).
    model_flops: Useful FLOPs per step (LoRA's actual FLOPs).
    compiler_flops: FLOPs per chip from `cost_analysis`.
    compiler_bytes_accessed: Bytes per chip from `cost_analysis`.
    compile_seconds: Lowering + compile wall time.
    collectives: One `{kind, count, bytes, static_count}` per kind.
    trainable_params: Adapter (or full) parameter count.
    notes: Remarks (replicated axes, what to try when it does not fit).
  """

  model: str
  topology: str
  chip: str
  chips: int
  mesh: dict[str, int]
  mode: str
  precision: str
  remat: str
  batch_size: int
  seq_len: int
  rank: int
  fits: bool
  hbm_per_chip_bytes: int
  hbm_capacity_bytes: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  breakdown: list[dict[str, Any]]
  step_seconds_estimate: float | None
  step_seconds_source: str | None
  tokens_per_second_estimate: float | None
  mfu_estimate: float | None
  model_flops: float
  compiler_flops: float | None
  compiler_bytes_accessed: float | None
  compile_seconds: float
  collectives: list[dict[str, Any]]
  trainable_params: int
  notes: list[str]

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict of every field."""
    return dataclasses.asdict(self)

  def to_text(self) -> str:
    """A human-readable summary."""
    g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    lines = [
        f"lorajax plan: {self.model} on {self.topology} ({self.chips} x"
        f" {self.chip}), mesh {_mesh_str(self.mesh)}, {self.mode},"
        f" {self.precision}, remat {self.remat}, batch {self.batch_size} x"
        f" seq {self.seq_len}, rank {self.rank}",
        f"  memory per chip: {g(self.hbm_per_chip_bytes)} of"
        f" {g(self.hbm_capacity_bytes)}"
        f" -> {'FITS' if self.fits else 'DOES NOT FIT'}",
        f"    arguments {g(self.argument_bytes)}, temporaries"
        f" {g(self.temp_bytes)}, outputs {g(self.output_bytes)} (aliased"
        f" {g(self.alias_bytes)})",
    ]
    for b in self.breakdown[:5]:
      lines.append(f"    {b['name']}: {g(b['bytes'])}")
    if self.step_seconds_estimate is not None:
      lines.append(f"  step time: {self.step_seconds_estimate:.4g} s,"
                   f" {self.tokens_per_second_estimate:.4g} tokens/s"
                   f" ({self.step_seconds_source})")
    else:
      lines.append("  step time: no estimate")
    if self.mfu_estimate is not None:
      lines.append(f"  MFU (LoRA's actual FLOPs, {self.model_flops:.3g} per"
                   f" step): {100 * self.mfu_estimate:.1f}%")
    lines.append(f"  compile: {self.compile_seconds:.1f} s")
    if self.collectives:
      lines.append("  collectives per step (per chip):")
      for c in self.collectives:
        lines.append(f"    {c['kind']}: {c['count']} ops, {g(c['bytes'])}")
    for n in self.notes:
      lines.append(f"  note: {n}")
    lines.append("  (compiler estimates, not measurements on hardware)")
    return "\n".join(lines)


def _remedies(mode: str, precision: str, remat: str) -> str:
  tips = []
  if remat != "full":
    tips.append("--remat full")
  if precision != "bf16":
    tips.append("--precision bf16")
  if mode == "full":
    tips.append("--mode factored (LoRA)")
  tips += ["a larger fsdp axis (more chips)",
           "a smaller --batch-size or --seq-len"]
  return ", ".join(tips[:-1]) + " or " + tips[-1]


def _oom_bytes(msg: str) -> int:
  """The largest size named in a compiler out-of-memory message."""
  units = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}
  sizes = [float(v) * units[u.upper()] for v, u in
           re.findall(r"\(([0-9.]+)\s*([KMGTkmgt]?)i?B?\)", msg)]
  return int(max(sizes)) if sizes else 0


def _measure(compiled: Any) -> float:
  """Runs the compiled step on zeros 4 times; the median of the last 3.

  Fresh inputs each run (the step donates some of them); only the run is
  timed.
  """
  info = compiled.args_info[0]
  leaves, tree = jax.tree.flatten(info)
  shardings = jax.tree.leaves(compiled.input_shardings[0])

  def fresh():
    return tree.unflatten([
        jax.device_put(np.zeros(a.shape, a.dtype), s)
        for a, s in zip(leaves, shardings)])

  times = []
  for _ in range(4):
    args = fresh()
    jax.block_until_ready(args)
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times[1:]))


def _mesh_str(mesh: Mapping[str, int]) -> str:
  return ",".join(f"{k}={v}" for k, v in mesh.items())


def _llama_config(hf: dict[str, Any], precision: str, remat: str,
                  num_layers: int | None, scan_layers: bool | None) -> Any:
  if num_layers is not None:
    hf = dict(hf, num_hidden_layers=int(num_layers))
  dtype = precision_policy(precision).compute_dtype
  try:
    config = llama_lib.LlamaConfig.from_hf_dict(hf, dtype=dtype)
  except (ValueError, TypeError, KeyError) as e:
    raise PlanError(f"The model config is not usable: {e}") from None
  fields = {f.name for f in dataclasses.fields(config)}
  extra: dict[str, Any] = {}
  if "remat" in fields:
    extra["remat"] = remat
  elif remat != "none":
    raise PlanError(
        f"--remat {remat} needs the Llama model's `remat` option, which this"
        " lorajax does not have; use --remat none."
    )
  if "scan_layers" in fields:
    extra["scan_layers"] = scan_layers
  elif scan_layers:
    raise PlanError(
        "Scanned layers need the Llama model's `scan_layers` option, which"
        " this lorajax does not have."
    )
  return dataclasses.replace(config, **extra) if extra else config


def _train_core():
  """The module holding lorajax's train step (core/train.py)."""
  return train_lib


def _train_step(loss_fn, optimizer, psh, ash, bsh):
  """The real lorajax train step (the one place that names it)."""
  train = _train_core().make_train_step(
      loss_fn, optimizer, param_shardings=psh, adapter_shardings=ash,
      batch_sharding=bsh)
  if not hasattr(train.step, "lower"):
    raise RuntimeError(
        "lorajax.make_train_step's `step` has no `lower` (ahead-of-time"
        " lowering), which `lorajax plan` needs.")
  return train


def _opt_shardings(optimizer, abstract, shardings, replicated):
  return _train_core()._opt_shardings(  # noqa: SLF001
      optimizer, abstract, shardings, replicated)


def plan(
    model: str | os.PathLike | Mapping[str, Any],
    *,
    topology: str,
    mesh: str | Mapping[str, int],
    batch_size: int,
    seq_len: int,
    rank: int = 16,
    alpha: float = 32.0,
    targets: str = "all-linear",
    mode: str = "factored",
    precision: str = "bf16",
    remat: str = "none",
    num_layers: int | None = None,
    scan_layers: bool | None = None,
    learning_rate: float = 1e-4,
    measure: bool = True,
) -> PlanReport:
  """Compiles one LoRA (or full fine-tuning) train step and reports on it.

  Args:
    model: A preset (`llama-3.1-8b`, `llama-3.1-70b`, `qwen2.5-7b`,
      `smollm2-135m`), a Hugging Face `config.json`, a checkpoint directory
      holding one, or a config dict.
    topology: A TPU topology name (`v5p:2x2x2`, `v6e:2x4`, `v5e:2x2`,
      `v5p:4x4x4`...; needs libtpu) or `local` (this machine's devices).
    mesh: Mesh axes, e.g. `"fsdp=8"` or `"data=2,fsdp=4"`; names among
      `data` (batch), `fsdp` (batch and weights), `tensor` (weights); the
      sizes must multiply to the number of chips.
    batch_size: Global batch in sequences (divisible by data * fsdp).
    seq_len: Tokens per sequence.
    rank: LoRA rank.
    alpha: LoRA alpha.
    targets: `LoraConfig.targets` (default all linear layers).
    mode: `factored` (`lorajax.lora`), `merged` (`lorajax.merge` then the
      model) or `full` (full fine-tuning, for comparison).
    precision: `bf16` (frozen base stored and computed in bfloat16; adapter
      and optimizer state float32) or `f32`.
    remat: Remat policy of the layers: `none`, `full`, `dots` or
      `projections` (see `LlamaConfig.remat`).
    num_layers: Override the model's depth (for quick plans).
    scan_layers: Stack the layers and run them with `lax.scan` (True), as
      a Python loop (False), or the model's default (None: scanned from 5
      layers on).
    learning_rate: AdamW learning rate (it does not change the estimates).
    measure: On local devices without a known peak FLOP rate, run the step
      (on zeros, when it fits) to time it.

  Returns:
    A `PlanReport`.

  Raises:
    PlanError: For an unknown preset or topology, a missing libtpu, a mesh
      that does not match the chips, or a batch the mesh does not divide.
  """
  if mode not in MODES:
    raise PlanError(f"--mode {mode!r}: choose one of {', '.join(MODES)}.")
  if precision not in PRECISIONS:
    raise PlanError(f"--precision {precision!r}: choose one of"
                    f" {', '.join(PRECISIONS)}.")
  if remat not in REMATS:
    raise PlanError(f"--remat {remat!r}: choose one of {', '.join(REMATS)}.")
  for name, v in (("--batch-size", batch_size), ("--seq-len", seq_len),
                  ("--rank", rank)):
    if int(v) < 1:
      raise PlanError(f"{name} must be >= 1; got {v}.")
  name, hf = model_config_dict(model)
  axes = parse_mesh(mesh)
  devices, chip = devices_for(topology)
  n = math.prod(axes.values())
  if n != len(devices):
    raise PlanError(
        f"--mesh {_mesh_str(axes)} has {n} devices but --topology"
        f" {topology} has {len(devices)} chips. Make the mesh sizes multiply"
        f" to {len(devices)}, e.g. --mesh fsdp={len(devices)}."
    )
  batch_ways = axes.get("data", 1) * axes.get("fsdp", 1)
  if batch_size % batch_ways:
    raise PlanError(
        f"--batch-size {batch_size} is not divisible by data x fsdp ="
        f" {batch_ways}; each of those devices takes an equal share of the"
        f" batch. Use a multiple of {batch_ways}."
    )
  config = _llama_config(hf, precision, remat, num_layers, scan_layers)
  policy = precision_policy(precision)
  param_dtype = jnp.dtype(policy.param_dtype)

  abstract_params = jax.eval_shape(
      lambda k: llama_lib.init_params(config, key=k, dtype=param_dtype),
      jax.random.key(0))
  specs, notes = param_specs(abstract_params, axes)
  dev_mesh = Mesh(np.asarray(devices).reshape(tuple(axes.values())),
                  tuple(axes), axis_types=(AxisType.Auto,) * len(axes))
  psh = jax.tree.map(lambda s: NamedSharding(dev_mesh, s), specs,
                     is_leaf=lambda x: isinstance(x, PartitionSpec))
  batch_axes = tuple(a for a in ("data", "fsdp") if a in axes)
  bspec = PartitionSpec(batch_axes if len(batch_axes) > 1 else
                        (batch_axes[0] if batch_axes else None))
  bsh = NamedSharding(dev_mesh, bspec)
  ids = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  batch = (ids, ids, ids)

  # The activations entering each layer's projections stay batch-sharded,
  # so FSDP-sharded weights are all-gathered per layer (not activations
  # all-reduced).
  act_sh = NamedSharding(dev_mesh, PartitionSpec(bspec[0], None, None))

  def apply(p, input_ids, attention_mask):
    return llama_lib.forward(p, config, input_ids, attention_mask,
                             activation_sharding=act_sh)

  def token_loss(logits, input_ids, loss_mask):
    from lorajax._src.app.finetune import loss_sums  # noqa: PLC0415
    s, cnt = loss_sums(logits, input_ids, loss_mask)
    return s / jnp.maximum(cnt, 1.0)

  optimizer = optax.adamw(learning_rate, mu_dtype=jnp.float32)
  stacked = any(
      re.fullmatch(r"model/layers/[^0-9].*", paths_lib.path_str(kp))
      for kp, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0])
  lora_config = policy.lora_config(LoraConfig(
      rank=rank, alpha=alpha, targets=targets,
      axes={r"model/layers/.*": "sio"} if stacked else None))
  lora_plan = {} if mode == "full" else lora_config.plan(abstract_params)
  t0 = time.perf_counter()
  if mode == "full":
    p_abs = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_params, psh)
    opt_abs = jax.eval_shape(optimizer.init, abstract_params)
    opt_sh = _opt_shardings(optimizer, abstract_params, psh,
                            NamedSharding(dev_mesh, PartitionSpec()))

    def full_step(params, opt_state, batch):
      def loss(p):
        return token_loss(apply(p, batch[0], batch[1]), batch[0], batch[2])
      value, grads = jax.value_and_grad(loss)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value

    step = jax.jit(full_step, in_shardings=(psh, opt_sh, bsh),
                   out_shardings=(psh, opt_sh, NamedSharding(
                       dev_mesh, PartitionSpec())),
                   donate_argnums=(0, 1))
    lowered = step.lower(p_abs, opt_abs, batch)
    trainable = sum(math.prod(x.shape)
                    for x in jax.tree.leaves(abstract_params))
    arg_groups = {"params (trained, with gradients)": (abstract_params, psh),
                  "optimizer state": (opt_abs, opt_sh)}
  else:
    abstract_adapter = jax.eval_shape(
        lambda k: adapter_lib.init(abstract_params, lora_config, key=k),
        jax.random.key(0))
    ash = sharding_lib.adapter_shardings(psh, abstract_adapter)
    if mode == "factored":
      from lorajax._src.core.factored import lora  # noqa: PLC0415
      forward = lora(apply)
    else:
      def forward(p, a, i, m):
        return apply(adapter_lib.merge(p, a), i, m)

    def loss_fn(params, adapter, batch):
      logits = forward(params, adapter, batch[0], batch[1])
      return token_loss(logits, batch[0], batch[2])

    train = _train_step(loss_fn, optimizer, psh, ash, bsh)
    opt_abs = jax.eval_shape(optimizer.init, abstract_adapter)
    lowered = train.step.lower(abstract_params, abstract_adapter, opt_abs,
                               batch)
    trainable = sum(math.prod(x.shape)
                    for x in jax.tree.leaves(abstract_adapter))
    opt_sh = _opt_shardings(optimizer, abstract_adapter, ash,
                            NamedSharding(dev_mesh, PartitionSpec()))
    arg_groups = {"frozen params": (abstract_params, psh),
                  "adapter": (abstract_adapter, ash),
                  "optimizer state": (opt_abs, opt_sh)}
  oom = None
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses programs whose temporaries exceed HBM.
    if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e):
      raise
    compiled, oom = None, " ".join(str(e).split())
  compile_seconds = time.perf_counter() - t0

  if compiled is not None:
    mem = compiled.memory_analysis()
    arg_b = int(getattr(mem, "argument_size_in_bytes", 0))
    out_b = int(getattr(mem, "output_size_in_bytes", 0))
    alias_b = int(getattr(mem, "alias_size_in_bytes", 0))
    temp_b = int(getattr(mem, "temp_size_in_bytes", 0))
    code_b = int(getattr(mem, "generated_code_size_in_bytes", 0))
  else:
    arg_b = sum(_per_chip_bytes(x, s.spec, axes)
                for tree, shs in arg_groups.values()
                for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(
                    shs, is_leaf=lambda x: isinstance(x, NamedSharding))))
    arg_b += 3 * _per_chip_bytes(ids, bspec, axes)
    out_b = alias_b = code_b = 0
    temp_b = _oom_bytes(oom or "")
    notes.append(f"the compiler stopped: {(oom or '')[:300]}")
  total = arg_b + out_b - alias_b + temp_b + code_b
  fits = compiled is not None and bool(chip.hbm_bytes) and (
      total <= chip.hbm_bytes)

  breakdown: list[dict[str, Any]] = [
      {"name": "temporaries (activations, gradients, buffers)",
       "bytes": temp_b}]
  leaves = []
  for gname, (tree, shs) in arg_groups.items():
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sh_leaves = jax.tree.leaves(
        shs, is_leaf=lambda x: isinstance(x, NamedSharding))
    gbytes = 0
    for (kp, x), s in zip(flat, sh_leaves):
      b = _per_chip_bytes(x, s.spec, axes)
      gbytes += b
      leaves.append((b, f"{gname}: {paths_lib.path_str(kp)}"))
    breakdown.append({"name": gname, "bytes": gbytes})
  breakdown.append({"name": "batch", "bytes": 3 * _per_chip_bytes(
      ids, bspec, axes)})
  if out_b - alias_b > 0:
    breakdown.append({"name": "outputs not aliased to inputs",
                      "bytes": out_b - alias_b})
  breakdown.sort(key=lambda b: -b["bytes"])
  if not fits:
    top = ", ".join(f"{b['name']} {b['bytes'] / GiB:.2f} GiB"
                    for b in breakdown[:3])
    leaves.sort(key=lambda t: -t[0])
    big = ", ".join(f"{p} {b / GiB:.2f} GiB" for b, p in leaves[:3])
    notes.insert(0, (
        f"does not fit: {total / GiB:.2f} GiB per chip needed, "
        f"{chip.hbm_bytes / GiB:.2f} GiB available. Biggest consumers: {top}."
        f" Largest arrays per chip: {big}. Try"
        f" {_remedies(mode, precision, remat)}."))

  cost = compiled.cost_analysis() if compiled is not None else {}
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else {}
  cost = dict(cost or {})
  secs = cost.get("optimal_seconds")
  secs = float(secs) if secs is not None and secs > 0 else None
  source = "compiler optimal_seconds" if secs else None
  tokens = batch_size * seq_len
  flops = model_flops_per_token(config, lora_plan, abstract_params, mode,
                                seq_len) * tokens
  c_flops = float(cost["flops"]) if "flops" in cost else None
  c_bytes = (float(cost["bytes accessed"]) if "bytes accessed" in cost
             else None)
  if secs is not None and c_flops:
    # XLA's cost analysis counts a loop body (the scanned layers) once.
    # When it counts fewer FLOPs than the step does, its time estimate is
    # scaled by the same ratio (its time per counted FLOP is kept).
    ratio = flops / len(devices) / c_flops
    if ratio > 1.05:
      secs *= ratio
      source = (f"compiler optimal_seconds x {ratio:.2f} (the FLOPs its cost"
                " analysis does not count in loop bodies)")
  if secs is None and c_flops and math.isfinite(chip.peak_flops):
    # Roofline on the cost model's counts. XLA's cost analysis counts a
    # loop body once, so when it counts fewer FLOPs than the model does,
    # both of its counts are scaled up by that ratio.
    per_chip = flops / len(devices)
    scale = max(1.0, per_chip / c_flops)
    secs = max(scale * c_flops / chip.peak_flops,
               scale * (c_bytes or 0.0) / chip.hbm_bandwidth)
    source = "roofline of cost_analysis (flops / peak, bytes / HBM bandwidth)"
  if (secs is None and topology in ("local", "cpu", "gpu") and fits
      and measure):
    secs = _measure(compiled)
    source = "measured on the local devices (median of 3 runs)"
  tps = tokens / secs if secs else None
  mfu = None
  if secs and math.isfinite(chip.peak_flops):
    mfu = flops / (len(devices) * chip.peak_flops * secs)
  if secs is None:
    notes.append("no step-time estimate: the compiler gives none and the"
                 " step was not run")
  return PlanReport(
      model=name, topology=topology, chip=chip.name, chips=len(devices),
      mesh=axes, mode=mode, precision=precision, remat=remat,
      batch_size=batch_size, seq_len=seq_len,
      rank=0 if mode == "full" else rank, fits=fits,
      hbm_per_chip_bytes=total, hbm_capacity_bytes=int(chip.hbm_bytes),
      argument_bytes=arg_b, output_bytes=out_b, alias_bytes=alias_b,
      temp_bytes=temp_b, breakdown=breakdown,
      step_seconds_estimate=secs, step_seconds_source=source,
      tokens_per_second_estimate=tps,
      mfu_estimate=mfu, model_flops=flops,
      compiler_flops=c_flops, compiler_bytes_accessed=c_bytes,
      compile_seconds=compile_seconds,
      collectives=(collectives(compiled.as_text() or "") if compiled is not None
                   else []),
      trainable_params=int(trainable), notes=notes)


def add_arguments(p: Any) -> None:
  """Adds the `lorajax plan` flags to an argparse parser."""
  p.add_argument("--model", required=True,
                 help=f"preset ({', '.join(sorted(PRESETS))}), a Hugging"
                 " Face config.json, or a checkpoint directory.")
  p.add_argument("--topology", required=True,
                 help="TPU topology (v5p:2x2x2, v6e:2x4, v5e:2x2,"
                 " v5p:4x4x4...; needs libtpu) or 'local'.")
  p.add_argument("--mesh", required=True,
                 help="mesh axes, e.g. fsdp=8 or data=2,fsdp=4 or"
                 " fsdp=16,tensor=4 (axes: data, fsdp, tensor).")
  p.add_argument("--batch-size", type=int, required=True)
  p.add_argument("--seq-len", type=int, required=True)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--alpha", type=float, default=32.0)
  p.add_argument("--targets", default="all-linear")
  p.add_argument("--mode", choices=MODES, default="factored")
  p.add_argument("--precision", choices=PRECISIONS, default="bf16")
  p.add_argument("--remat", choices=REMATS, default="none")
  p.add_argument("--num-layers", type=int, default=None,
                 help="override the model's depth (quick plans).")
  p.add_argument("--scan", choices=("auto", "on", "off"), default="auto",
                 help="scanned layers (auto: from 5 layers on).")
  p.add_argument("--json", action="store_true",
                 help="print one JSON object instead of text.")


def run(args: Any) -> int:
  """Runs `lorajax plan` from parsed arguments; prints the report."""
  report = plan(
      args.model, topology=args.topology, mesh=args.mesh,
      batch_size=args.batch_size, seq_len=args.seq_len, rank=args.rank,
      alpha=args.alpha, targets=args.targets, mode=args.mode,
      precision=args.precision, remat=args.remat, num_layers=args.num_layers,
      scan_layers={"auto": None, "on": True, "off": False}[args.scan])
  if args.json:
    print(json.dumps(report.to_dict()), flush=True)
  else:
    print(report.to_text(), flush=True)
  return 0

