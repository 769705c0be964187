"""PEFT interop: read and write Hugging Face PEFT LoRA adapter directories."""

import collections
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from lorajax._src.core import fileio, safetensors_io
from lorajax._src.core import paths as paths_lib
from lorajax._src.core.adapter import LoraWeight
from lorajax._src.core.adapter import is_node as _is_node
from lorajax._src.core.typing import PyTree

NameMap = Mapping[str, str] | Callable[[str], str | None] | None

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_WEIGHT_LEAVES = ("kernel", "weight", "w")
# Keys of adapter_config.json that `save` accepts as keyword arguments.
_CONFIG_KEYS = ("base_model_name_or_path", "task_type", "revision",
                "lora_dropout", "inference_mode")
_KEY_RE = re.compile(r"(.+)\.lora_([AB])(?:\.([^.]+))?\.weight")


def _default_module(path: str) -> str | None:
  parts = path.split("/")
  if len(parts) < 2 or parts[-1] not in _WEIGHT_LEAVES:
    return None
  return ".".join(parts[:-1])


def _module_name(path: str, name_map: NameMap) -> str | None:
  """The PEFT module name of the weight at `path` (None if it has none)."""
  if name_map is None:
    return _default_module(path)
  if isinstance(name_map, Mapping):
    return name_map.get(path, None)
  if callable(name_map):
    name = name_map(path)
    if name is not None and not isinstance(name, str):
      raise TypeError(
          f"`name_map` returned {name!r} for {path!r}; it must return a"
          " module name string such as 'model.layers.0.self_attn.q_proj', or"
          " None for weights without one."
      )
    return name
  raise TypeError(
      "`name_map` must be None, a dict from lorajax weight path to PEFT"
      " module name, or a callable doing that mapping; got"
      f" {type(name_map).__name__}."
  )


def peft_pattern_key(keys, module: str) -> str | None:
  """PEFT's `rank_pattern`/`alpha_pattern` rule: the first key `k` in order
  with `re.match(rf"(.*\\.)?({k})$", module)`."""
  for k in keys:
    if re.match(rf"(.*\.)?({k})$", module):
      return k
  return None


def _flatten_pair(path: str, node: LoraWeight) -> tuple[np.ndarray, np.ndarray]:
  """(a, b) as (in, r), (r, out) matrices, flattening multi-axis in/out."""
  if "s" in node.axes:
    raise ValueError(
        f"{path!r} has a stacked adapter (axes {node.axes!r}); PEFT stores one"
        " matrix pair per module. Unstack the layers first (one params entry"
        " per layer, as `lorajax.models.llama` has) before `lorajax.peft.save`."
    )
  a = np.asarray(jax.device_get(node.a))
  b = np.asarray(jax.device_get(node.b))
  return a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1)


def _clean(x: float) -> float:
  """Rounds away float32 noise (31.99999809 -> 32.0) for the JSON config."""
  r = float(f"{x:.6g}")
  return r if math.isclose(r, x, rel_tol=1e-6) else float(x)


def save(
    directory: str | os.PathLike,
    adapter: PyTree,
    *,
    name_map: NameMap = None,
    overwrite: bool = False,
    **metadata: Any,
) -> None:
  """Writes `adapter` as a PEFT LoRA directory that `PeftModel` loads.

  Writes `adapter_config.json` and `adapter_model.safetensors` with keys
  `base_model.model.<module>.lora_A.weight` (`a.T`, shape (r, in)) and
  `...lora_B.weight` (`b.T`, shape (out, r)). The most common rank and alpha
  become `r` and `lora_alpha`; other modules get full-name entries in
  `rank_pattern` / `alpha_pattern`. `use_rslora` is the adapters' `rslora`
  flag (the most common one if they differ, and the others get the alpha
  that keeps their scale), so PEFT's scale equals each adapter's `scale`.
  `target_modules` lists the short module names (e.g. `q_proj`) when that
  selects exactly the adapted modules, otherwise their full names. Files go
  to a temporary directory that is renamed into place.

  Args:
    directory: The output directory. It must not exist or be empty unless
      `overwrite`.
    adapter: An adapter pytree (from `lorajax.init` or `load`).
    name_map: Maps a lorajax weight path (`model/layers/0/self_attn/q_proj/
      kernel`) to a PEFT module name (`model.layers.0.self_attn.q_proj`): a
      dict or a callable. By default the module name is the path without its
      last component (`kernel`/`weight`/`w`), joined by dots, which is right
      for `lorajax.models.llama` params.
    overwrite: Replace an existing non-empty `directory`.
    **metadata: `base_model_name_or_path`, `task_type` (default
      `"CAUSAL_LM"`), `revision`, `lora_dropout` and `inference_mode` go into
      adapter_config.json; any other keyword is stored as a JSON string in the
      safetensors header metadata.

  Raises:
    ValueError: If the adapter is empty, has stacked adapters, a weight has no
      module name, two weights share one, or `directory` is not empty.
  """
  directory = os.fspath(directory)
  flat = paths_lib.leaves_with_paths(adapter, is_leaf=_is_node)
  nodes = [(p, n) for p, n in flat if isinstance(n, LoraWeight)]
  if not nodes:
    raise ValueError(
        "The adapter has no LoraWeight nodes; nothing to save. Build it with"
        " `lorajax.init(params, config, key=...)`."
    )
  if os.path.exists(directory) and os.listdir(directory) and not overwrite:
    raise ValueError(
        f"{directory!r} exists and is not empty; pass `overwrite=True` to"
        " replace it, or choose a new directory."
    )
  entries = []
  seen: dict[str, str] = {}
  for path, node in nodes:
    module = _module_name(path, name_map)
    if module is None and name_map is not None:
      raise ValueError(
          f"`name_map` gives no PEFT module name for the adapted weight"
          f" {path!r}; add an entry mapping it to a module name such as"
          " 'model.layers.0.self_attn.q_proj'."
      )
    if module is None:
      raise ValueError(
          f"{path!r} has no PEFT module name: its last path component is not"
          " 'kernel', 'weight' or 'w'. Pass `name_map` mapping it to a module"
          " name such as 'model.layers.0.self_attn.q_proj'."
      )
    if module in seen:
      raise ValueError(
          f"{path!r} and {seen[module]!r} both map to PEFT module"
          f" {module!r}; fix `name_map` so each weight has its own module."
      )
    seen[module] = path
    a, b = _flatten_pair(path, node)
    entries.append((module, node, a, b))

  # PEFT has one `use_rslora` for all modules: the adapters' flag (the most
  # common one if they differ; the others get the alpha that gives their
  # scale under it).
  use_rslora = collections.Counter(
      n.rslora for _, n, _, _ in entries).most_common(1)[0][0]
  ranks, alphas = {}, {}
  for module, node, _, _ in entries:
    ranks[module] = node.rank
    if node.rslora == use_rslora:
      alpha = node.alpha
    else:
      alpha = node.scale * (math.sqrt(node.rank) if use_rslora
                            else node.rank)
    alphas[module] = _clean(alpha)
  r = collections.Counter(ranks.values()).most_common(1)[0][0]
  lora_alpha = collections.Counter(alphas.values()).most_common(1)[0][0]

  # Short names if they select exactly the adapted modules.
  adapted = set(ranks)
  short = sorted({m.rsplit(".", 1)[-1] for m in adapted})
  others = set()
  for path, node in flat:
    if node is None:
      try:
        m = _module_name(path, name_map)
      except TypeError:
        m = None
      if m is not None:
        others.add(m)
  clash = [m for m in others
           if any(m == s or m.endswith("." + s) for s in short)]
  target_modules = short if not clash else sorted(adapted)

  config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": None,
      "revision": None,
      "r": r,
      "lora_alpha": lora_alpha,
      "target_modules": target_modules,
      "use_rslora": use_rslora,
      "rank_pattern": {m: k for m, k in ranks.items() if k != r},
      "alpha_pattern": {m: a for m, a in alphas.items() if a != lora_alpha},
      "lora_dropout": 0.0,
      "bias": "none",
      "fan_in_fan_out": False,
      "use_dora": False,
      "modules_to_save": None,
      "init_lora_weights": True,
      "inference_mode": True,
      "layers_to_transform": None,
      "layers_pattern": None,
  }
  header = {"format": "pt"}
  for k, v in metadata.items():
    if k in _CONFIG_KEYS:
      config[k] = v
    else:
      header[k] = v if isinstance(v, str) else json.dumps(v)
  tensors = {}
  for module, _, a, b in entries:
    tensors[f"{_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
    tensors[f"{_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.T)

  def write(tmp: str) -> None:
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
      json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata=header)

  fileio.write_dir_atomic(directory, write)


def _check_config(cfg: Mapping[str, Any], where: str) -> None:
  peft_type = cfg.get("peft_type")
  if peft_type != "LORA":
    raise ValueError(
        f"{where} has peft_type {peft_type!r}; lorajax.peft reads only LORA"
        " adapters. Convert the adapter to plain LoRA in PEFT first."
    )
  problems = []
  if cfg.get("use_dora"):
    problems.append(
        "use_dora=true (DoRA): lorajax adapters are plain LoRA; merge the"
        " DoRA adapter into the base weights in PEFT (`merge_and_unload`)"
        " instead")
  if cfg.get("fan_in_fan_out"):
    problems.append(
        "fan_in_fan_out=true (GPT-2 Conv1D layout) is not supported; export"
        " the adapter for a model with nn.Linear layers")
  if cfg.get("bias", "none") != "none":
    problems.append(
        f"bias={cfg.get('bias')!r} trains bias terms, which lorajax adapters"
        " do not hold; re-train with bias='none'")
  if cfg.get("lora_bias"):
    problems.append("lora_bias=true is not supported; re-train without it")
  if cfg.get("modules_to_save"):
    problems.append(
        f"modules_to_save={cfg.get('modules_to_save')!r} stores fully trained"
        " modules, which a LoRA adapter cannot express; save without"
        " modules_to_save or merge them into the base checkpoint")
  if problems:
    raise ValueError(
        f"{where} uses options lorajax.peft does not support:\n- "
        + "\n- ".join(problems)
    )


def load(
    directory: str | os.PathLike,
    params: PyTree,
    *,
    name_map: NameMap = None,
) -> PyTree:
  """Reads a PEFT LoRA directory into a lorajax adapter for `params`.

  Reads adapter_config.json and adapter_model.safetensors (never pickles), as
  written by `save` or by PEFT's `save_pretrained`. Each module's scale is
  `alpha / r` (or `alpha / sqrt(r)` with `use_rslora`), with `r` and `alpha`
  from `rank_pattern` / `alpha_pattern` when a key matches the module name
  (PEFT's rule: the first key `k` with `re.match(rf"(.*\\.)?({k})$",
  module)`), else `r` and `lora_alpha`.

  Args:
    directory: The adapter directory.
    params: The base params (arrays or `jax.ShapeDtypeStruct`) the adapter
      belongs to.
    name_map: Maps a lorajax weight path to a PEFT module name (a dict or a
      callable), as in `save`; by default the path minus its last component,
      dot-joined.

  Returns:
    An adapter pytree mirroring `params` (float32 `a`, `b`), `None` where the
    directory holds no adapter.

  Raises:
    ValueError: If a file is missing, the config uses an unsupported option
      (DoRA, fan_in_fan_out, bias, modules_to_save, non-LoRA peft_type), a
      module is unknown or half present, or a shape or rank does not fit.
  """
  directory = os.fspath(directory)
  cfg_path = os.path.join(directory, CONFIG_NAME)
  w_path = os.path.join(directory, WEIGHTS_NAME)
  if not os.path.exists(cfg_path):
    raise ValueError(
        f"{directory!r} has no {CONFIG_NAME}; expected a PEFT adapter"
        " directory (adapter_config.json + adapter_model.safetensors)."
    )
  if not os.path.exists(w_path):
    other = os.path.join(directory, "adapter_model.bin")
    hint = (" It has adapter_model.bin, a pickle, which lorajax does not"
            " read: re-save it in PEFT with safe_serialization=True."
            if os.path.exists(other) else "")
    raise ValueError(f"{directory!r} has no {WEIGHTS_NAME}.{hint}")
  with open(cfg_path) as f:
    cfg = json.load(f)
  _check_config(cfg, cfg_path)
  r_default = int(cfg.get("r", 8))
  alpha_default = float(cfg.get("lora_alpha", 8))
  rank_pattern = dict(cfg.get("rank_pattern") or {})
  alpha_pattern = dict(cfg.get("alpha_pattern") or {})
  use_rslora = bool(cfg.get("use_rslora", False))

  pairs: dict[str, dict[str, np.ndarray]] = {}
  bad = []
  with safetensors_io.SafetensorsFile(w_path) as f:  # reads bfloat16
    for key in f.keys():  # noqa: SIM118
      m = _KEY_RE.fullmatch(key)
      if not key.startswith(_PREFIX) or m is None:
        bad.append(key)
        continue
      module = m.group(1)[len(_PREFIX):]
      pairs.setdefault(module, {})[m.group(2)] = f.get_tensor(key)
  if bad:
    raise ValueError(
        f"{w_path} holds tensors that are not LoRA A/B matrices of linear"
        f" layers: {bad[:6]}. Embedding LoRA (lora_embedding_A/B), DoRA"
        " magnitudes and saved full modules are not supported."
    )
  if not pairs:
    raise ValueError(f"{w_path} holds no LoRA tensors.")

  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  by_module: dict[str, int] = {}
  for idx, (kp, _) in enumerate(flat):
    module_name = _module_name(paths_lib.path_str(kp), name_map)
    if module_name is not None:
      by_module[module_name] = idx
  errors = []
  nodes: list[Any] = [None] * len(flat)
  for module, ab in pairs.items():
    if set(ab) != {"A", "B"}:
      missing = "lora_B" if "A" in ab else "lora_A"
      errors.append(
          f"{module}: {missing}.weight is missing from {WEIGHTS_NAME}; the"
          " file is incomplete, re-save the adapter.")
      continue
    if module not in by_module:
      known = sorted(by_module)
      errors.append(
          f"{module}: no weight in `params` has this module name. Known"
          " module names:\n" + paths_lib.format_paths(known, 6)
          + "\n  Pass `name_map` (lorajax path -> PEFT module name) for"
          " params that do not follow Hugging Face names, or load the"
          " adapter with the base model it was trained on.")
      continue
    idx = by_module[module]
    path = paths_lib.path_str(flat[idx][0])
    w = flat[idx][1]
    shape = tuple(w.shape)
    a, b = ab["A"], ab["B"]
    if len(shape) != 2:
      errors.append(
          f"{module}: lorajax weight {path!r} has shape {shape}; PEFT"
          " adapters load into 2-D (in, out) kernels only.")
      continue
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
      errors.append(
          f"{module}: lora_A {a.shape} and lora_B {b.shape} are not an"
          " (r, in), (out, r) pair; the file is corrupt.")
      continue
    rank = a.shape[0]
    if (a.shape[1], b.shape[0]) != shape:
      errors.append(
          f"{module}: lora_A {a.shape} / lora_B {b.shape} fit a weight of"
          f" shape (in, out)={(a.shape[1], b.shape[0])}, but {path!r} has"
          f" shape {shape}. The adapter was trained for a different base"
          " model, or `name_map` points at the wrong weight.")
      continue
    key = peft_pattern_key(rank_pattern, module)
    r_cfg = int(rank_pattern[key]) if key is not None else r_default
    if r_cfg != rank:
      errors.append(
          f"{module}: the tensors have rank {rank} but adapter_config.json"
          f" says r={r_cfg} (r / rank_pattern). Fix adapter_config.json so"
          " the scale is computed from the right rank.")
      continue
    key = peft_pattern_key(alpha_pattern, module)
    alpha = float(alpha_pattern[key]) if key is not None else alpha_default
    nodes[idx] = LoraWeight(
        a=jnp.asarray(a.T, jnp.float32), b=jnp.asarray(b.T, jnp.float32),
        alpha=alpha, axes="io", rslora=use_rslora,
    )
  if errors:
    raise ValueError(
        f"The PEFT adapter in {directory!r} does not fit these params:\n- "
        + "\n- ".join(errors)
    )
  return jax.tree_util.tree_unflatten(treedef, nodes)
