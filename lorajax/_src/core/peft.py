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
from lorajax._src.core.adapter import LoraWeight, VeraWeight
from lorajax._src.core.adapter import is_node as _is_node
from lorajax._src.core.methods import to_lora
from lorajax._src.core.typing import PyTree

NameMap = Mapping[str, str] | Callable[[str], str | None] | None

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_WEIGHT_LEAVES = ("kernel", "weight", "w")
# Keys of adapter_config.json that `save` accepts as keyword arguments.
_CONFIG_KEYS = ("base_model_name_or_path", "task_type", "revision",
                "lora_dropout", "inference_mode")
_KEY_RE = re.compile(
    r"(.+)\.(?:lora_([AB])(?:\.([^.]+))?\.weight|lora_(magnitude)_vector"
    r"(?:\.weight)?)")


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


def _module_template(path: str, name_map: NameMap) -> str | None:
  """The module name of a stacked weight's slices, `{}` for the index.

  `name_map` may give it directly (a name containing `{}`); by default the
  index goes after the last `layers` part of the default module name when
  no index follows it (`model/layers/self_attn/q_proj/kernel` ->
  `model.layers.{}.self_attn.q_proj`, the Hugging Face name of each layer's
  module).
  """
  name = _module_name(path, name_map)
  if name is None:
    return None
  if "{}" in name:
    return name
  if name_map is None:
    parts = name.split(".")
    if "layers" in parts:
      j = len(parts) - 1 - parts[::-1].index("layers")
      if j + 1 < len(parts) and not any(q.isdigit() for q in parts[j + 1:]):
        return ".".join([*parts[:j + 1], "{}", *parts[j + 1:]])
  return None


def peft_pattern_key(keys, module: str) -> str | None:
  """PEFT's `rank_pattern`/`alpha_pattern` rule: the first key `k` in order
  with `re.match(rf"(.*\\.)?({k})$", module)`."""
  for k in keys:
    if re.match(rf"(.*\.)?({k})$", module):
      return k
  return None


def _flatten_pairs(path: str, node: LoraWeight
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
  """(a, b) as (in, r), (r, out) matrices, one pair per stacked slice.

  Multi-axis in/out are flattened. An adapter with a leading stack axis
  (`"s..."`, scan-stacked layers) gives one pair per layer.
  """
  n_s = node.axes.count("s")
  if n_s > 1 or (n_s == 1 and node.axes[0] != "s"):
    raise ValueError(
        f"{path!r} has an adapter with axes {node.axes!r}; PEFT stores one"
        " matrix pair per module, so lorajax.peft writes only adapters with"
        " no stack axis or one leading stack axis (scan-stacked layers,"
        " axes 'sio'). Expert-stacked adapters have no PEFT module names."
    )
  a = np.asarray(jax.device_get(node.a))
  b = np.asarray(jax.device_get(node.b))
  if n_s == 0:
    return [(a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1))]
  return [(a[i].reshape(-1, a.shape[-1]), b[i].reshape(b.shape[1], -1))
          for i in range(a.shape[0])]


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
    initial_adapter: PyTree | None = None,
    **metadata: Any,
) -> None:
  """Writes `adapter` as a PEFT LoRA directory that `PeftModel` loads.

  DoRA adapters are written with `use_dora: true` and each module's
  `lora_magnitude_vector`; a tree of `VeraWeight`s is written as PEFT's
  `VERA` format (`vera_lambda_b`/`vera_lambda_d` per module, the shared
  `vera_A`/`vera_B` saved as with `save_projection=True`). With
  `initial_adapter` (the adapter `lorajax.decompose` returned for PiSSA or
  OLoRA), the trained adapter is first converted to a plain LoRA of twice
  the rank relative to the ORIGINAL base (`lorajax.peft.to_lora`, PEFT's
  `path_initial_model_for_weight_conversion`), so
  `PeftModel.from_pretrained(original_base, directory)` reproduces the
  fine-tuned model. Without it, a PiSSA/OLoRA adapter is saved as is, to be
  loaded on the residual base.

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
      for `lorajax.models.llama` params. A stacked adapter (axes `"sio"`,
      scan-stacked layers) is written as one module per layer: by default
      the layer index goes after the path's last `layers` part
      (`model/layers/self_attn/q_proj/kernel` -> `model.layers.<i>.
      self_attn.q_proj`); a `name_map` entry for it gives a name with `{}`
      where the index goes.
    overwrite: Replace an existing non-empty `directory`.
    initial_adapter: For PiSSA/OLoRA: the adapter before training; the
      export becomes a plain LoRA relative to the original base.
    **metadata: `base_model_name_or_path`, `task_type` (default
      `"CAUSAL_LM"`), `revision`, `lora_dropout` and `inference_mode` go into
      adapter_config.json; any other keyword is stored as a JSON string in the
      safetensors header metadata.

  Raises:
    ValueError: If the adapter is empty, a weight has no module name (or a
      stacked one no per-layer name), two weights share one, an adapter has
      a stack axis other than one leading one, or `directory` is not empty.
  """
  directory = os.fspath(directory)
  if initial_adapter is not None:
    adapter = to_lora(adapter, initial_adapter)
  flat = paths_lib.leaves_with_paths(adapter, is_leaf=_is_node)
  if any(isinstance(n, VeraWeight) for _, n in flat):
    return _save_vera(directory, flat, name_map=name_map,
                      overwrite=overwrite, metadata=metadata)
  nodes = [(p, n) for p, n in flat if isinstance(n, LoraWeight)]
  dora = {n.magnitude is not None for _, n in nodes}
  if len(dora) > 1:
    raise ValueError(
        "The adapter mixes DoRA and plain LoRA nodes; a PEFT directory has"
        " one `use_dora` for all modules. Save them as two adapters.")
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
  module: str | None
  for path, node in nodes:
    if "s" in node.axes:
      pairs = _flatten_pairs(path, node)
      template = _module_template(path, name_map)
      if template is None:
        raise ValueError(
            f"{path!r} holds a stacked adapter (axes {node.axes!r}, one"
            " adapter per layer) but has no per-layer PEFT module name. Pass"
            " `name_map` giving a module name with `{}` where the layer"
            " index goes, e.g. {" + repr(path) + ":"
            " 'model.layers.{}.self_attn.q_proj'}."
        )
      for i, (a, b) in enumerate(pairs):
        module = template.format(i)
        if module in seen:
          raise ValueError(
              f"{path!r} (layer {i}) and {seen[module]!r} both map to PEFT"
              f" module {module!r}; fix `name_map`."
          )
        seen[module] = f"{path}[{i}]"
        entries.append((module, node, a, b))
      continue
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
    (a, b), = _flatten_pairs(path, node)
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
      "use_dora": dora == {True},
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
  for module, node, a, b in entries:
    tensors[f"{_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
    tensors[f"{_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
    if node.magnitude is not None:
      tensors[f"{_PREFIX}{module}.lora_magnitude_vector"] = np.asarray(
          jax.device_get(node.magnitude)).reshape(-1)

  def write(tmp: str) -> None:
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
      json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata=header)

  fileio.write_dir_atomic(directory, write)


# PEFT LoraConfig options with no lorajax counterpart: (key, fix).
# (`layers_to_transform` needs no counterpart: only the listed layers have
# tensors in the file, and lorajax adapts exactly the modules it finds.)
_UNSUPPORTED = (
    ("layer_replication", "expand the base model first"),
    ("trainable_token_indices", "re-train without trainable tokens"),
    ("target_parameters", "adapt nn.Linear modules via target_modules"),
    ("alora_invocation_tokens", "aLoRA is not supported"),
    ("use_qalora", "QA-LoRA is not supported"),
    ("use_bdlora", "BD-LoRA is not supported"),
    ("megatron_config", "Megatron-parallel layers are not supported"),
)
# init_lora_weights values whose saved weights pair with a changed base.
_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _check_config(cfg: Mapping[str, Any], where: str) -> None:
  peft_type = cfg.get("peft_type")
  if peft_type not in ("LORA", "VERA"):
    raise ValueError(
        f"{where} has peft_type {peft_type!r}; lorajax.peft reads LORA"
        " (including DoRA, rsLoRA, EVA and converted PiSSA/OLoRA) and VERA"
        " adapters. Convert the adapter to plain LoRA in PEFT first."
    )
  problems = []
  for key, fix in _UNSUPPORTED:
    if cfg.get(key):
      problems.append(f"{key}={cfg.get(key)!r}: {fix}")
  init = str(cfg.get("init_lora_weights", True)).lower()
  if init.startswith(_MUTATING_INITS):
    problems.append(
        f"init_lora_weights={cfg.get('init_lora_weights')!r}: these weights"
        " pair with a base that PEFT changes on load (the residual of the"
        " decomposition). Re-save the adapter in PEFT with"
        " `save_pretrained(..., path_initial_model_for_weight_conversion=...)`"
        " (a plain LoRA on the original base), or set init_lora_weights to"
        " true in adapter_config.json and load it onto the residual params"
        " `lorajax.decompose` returns")
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


def _stack_layers(path: str, shape: tuple[int, ...],
                  per_layer: Mapping[int, tuple], rslora: bool,
                  errors: list[str]) -> LoraWeight | None:
  """One `"sio"` adapter from the per-layer PEFT pairs of a stacked weight.

  Layers the file has no adapter for get zero `a` and `b` (no update), as
  they have none in PEFT. Layers whose alpha differs from the most common one
  get their `b` rescaled by the alpha ratio (their rank is the same), so
  every layer's update is exactly PEFT's.
  """
  ranks = {v[2] for v in per_layer.values()}
  if len(ranks) != 1:
    errors.append(
        f"{path!r}: its layers have adapters of ranks {sorted(ranks)}, but a"
        " stacked (scan) weight holds one rank for all layers. Load the"
        " adapter into per-layer params (scan_layers=False, or"
        " `lorajax.models.llama.unstack_layers(params)`).")
    return None
  rank = ranks.pop()
  alphas = collections.Counter(v[3] for v in per_layer.values())
  alpha = alphas.most_common(1)[0][0]
  n, d_in, d_out = shape
  a = np.zeros((n, d_in, rank), np.float32)
  b = np.zeros((n, rank, d_out), np.float32)
  for i, (la, lb, _, layer_alpha) in per_layer.items():
    a[i] = np.asarray(la, np.float32).T
    b[i] = np.asarray(lb, np.float32).T * np.float32(layer_alpha / alpha)
  return LoraWeight(a=jnp.asarray(a), b=jnp.asarray(b), alpha=alpha,
                    axes="sio", rslora=rslora)


def _read_config(path: str | os.PathLike) -> dict[str, Any]:
  """Reads an adapter_config.json: a JSON object, or a ValueError naming the
  file (and line and column for invalid JSON)."""
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{path!r} cannot be read: {e}.") from None
  try:
    cfg = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(
        f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); the file is"
        " damaged or truncated. Restore it from the original adapter or"
        " re-save the adapter."
    ) from None
  if not isinstance(cfg, dict):
    raise ValueError(
        f"{path}: expected a JSON object (PEFT adapter config); got"
        f" {type(cfg).__name__}."
    )
  return cfg


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
      dot-joined. A 3-D weight whose name has a layer slot (`{}` from
      `name_map`, or by default a `layers` part:
      `model/layers/self_attn/q_proj/kernel`) is a scan-stacked weight: the
      modules `model.layers.<i>.self_attn.q_proj` load into one adapter with
      axes `"sio"` (zero for layers the file has no adapter for).

  Returns:
    An adapter pytree mirroring `params` (float32 `a`, `b`), `None` where the
    directory holds no adapter.

  Raises:
    ValueError: If a file is missing or unreadable, adapter_config.json is
      not JSON (naming its line), the weights file is truncated or not
      safetensors (naming the file), the config uses an unsupported option
      (DoRA, fan_in_fan_out, bias, modules_to_save, non-LoRA peft_type), a
      module is unknown or half present, a shape or rank does not fit, or
      the layers of a stacked weight have different ranks.
  """
  directory = os.fspath(directory)
  cfg_path = os.path.join(directory, CONFIG_NAME)
  w_path = os.path.join(directory, WEIGHTS_NAME)
  problem = fileio.path_problem(directory, kind="dir")
  if problem is not None:
    raise ValueError(
        f"PEFT adapter directory {directory!r} {problem}. Pass a directory"
        " holding adapter_config.json and adapter_model.safetensors."
    )
  if not os.path.lexists(cfg_path):
    raise ValueError(
        f"{directory!r} has no {CONFIG_NAME}; expected a PEFT adapter"
        " directory (adapter_config.json + adapter_model.safetensors)."
    )
  if not os.path.lexists(w_path):
    other = os.path.join(directory, "adapter_model.bin")
    hint = (" It has adapter_model.bin, a pickle, which lorajax does not"
            " read: re-save it in PEFT with safe_serialization=True."
            if os.path.exists(other) else "")
    raise ValueError(f"{directory!r} has no {WEIGHTS_NAME}.{hint}")
  for p in (cfg_path, w_path):
    problem = fileio.path_problem(p, kind="file")
    if problem is not None:
      raise ValueError(f"{p!r} {problem}.")
  cfg = _read_config(cfg_path)
  _check_config(cfg, cfg_path)
  if cfg.get("peft_type") == "VERA":
    return _load_vera(directory, cfg, w_path, params, name_map=name_map)
  use_dora = bool(cfg.get("use_dora", False))
  try:
    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", 8))
    rank_pattern = dict(cfg.get("rank_pattern") or {})
    alpha_pattern = dict(cfg.get("alpha_pattern") or {})
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"{cfg_path}: `r`, `lora_alpha`, `rank_pattern` or `alpha_pattern`"
        f" has the wrong type ({e}); expected numbers and objects mapping"
        " module regexes to numbers. Fix the file or re-save the adapter."
    ) from None
  use_rslora = bool(cfg.get("use_rslora", False))

  pairs: dict[str, dict[str, np.ndarray]] = {}
  bad = []
  try:
    with safetensors_io.SafetensorsFile(w_path) as f:  # reads bfloat16
      for key in f.keys():  # noqa: SIM118
        m = _KEY_RE.fullmatch(key)
        if not key.startswith(_PREFIX) or m is None:
          bad.append(key)
          continue
        module = m.group(1)[len(_PREFIX):]
        pairs.setdefault(module, {})[m.group(2) or "m"] = f.get_tensor(key)
  except Exception as e:  # noqa: BLE001 (SafetensorError, OSError)
    size = os.path.getsize(w_path)
    raise ValueError(
        f"{w_path!r} is not a readable safetensors file ({size} bytes;"
        f" {type(e).__name__}: {e}). It is truncated (an interrupted copy or"
        " download) or in another format. Copy or re-save the adapter"
        " (`lorajax.peft.save`, or PEFT's `save_pretrained` with"
        " safe_serialization=True)."
    ) from None
  if bad:
    raise ValueError(
        f"{w_path} holds tensors that are not LoRA A/B matrices of linear"
        f" layers: {bad[:6]}. Embedding LoRA (lora_embedding_A/B) and saved"
        " full modules are not supported."
    )
  if not pairs:
    raise ValueError(f"{w_path} holds no LoRA tensors.")

  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  by_module: dict[str, int] = {}
  # Module name of each layer of a scan-stacked (layers, in, out) weight.
  by_layer: dict[str, tuple[int, int]] = {}
  for idx, (kp, w) in enumerate(flat):
    path = paths_lib.path_str(kp)
    template = (_module_template(path, name_map)
                if len(getattr(w, "shape", ())) == 3 else None)
    if template is not None:
      for i in range(w.shape[0]):
        by_layer[template.format(i)] = (idx, i)
      continue
    name = _module_name(path, name_map)
    if name is not None:
      by_module[name] = idx
  errors = []
  nodes: list[Any] = [None] * len(flat)
  stacked: dict[int, dict[int, tuple]] = {}
  for module, ab in pairs.items():
    want = {"A", "B", "m"} if use_dora else {"A", "B"}
    if "m" in ab and not use_dora:
      errors.append(
          f"{module}: {WEIGHTS_NAME} holds lora_magnitude_vector but"
          " adapter_config.json has use_dora=false; fix the config.")
      continue
    if set(ab) != want:
      missing = ", ".join(sorted(
          {"A": "lora_A.weight", "B": "lora_B.weight",
           "m": "lora_magnitude_vector"}[k] for k in want - set(ab)))
      errors.append(
          f"{module}: {missing} is missing from {WEIGHTS_NAME}; the"
          " file is incomplete, re-save the adapter.")
      continue
    if module in by_module:
      idx, layer = by_module[module], None
    elif module in by_layer:
      idx, layer = by_layer[module]
    else:
      known = sorted(by_module) + sorted(by_layer)
      errors.append(
          f"{module}: no weight in `params` has this module name. Known"
          " module names:\n" + paths_lib.format_paths(known, 6)
          + "\n  Pass `name_map` (lorajax path -> PEFT module name) for"
          " params that do not follow Hugging Face names, or load the"
          " adapter with the base model it was trained on.")
      continue
    path = paths_lib.path_str(flat[idx][0])
    shape = tuple(flat[idx][1].shape)
    where = path if layer is None else f"{path} (layer {layer})"
    if layer is not None:
      shape = shape[1:]
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
          f" shape (in, out)={(a.shape[1], b.shape[0])}, but {where!r} has"
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
    mag = None
    if use_dora:
      if tuple(ab["m"].shape) not in ((shape[1],), (1, shape[1])):
        errors.append(
            f"{module}: lora_magnitude_vector has shape {ab['m'].shape};"
            f" expected ({shape[1]},), one entry per output unit.")
        continue
      mag = jnp.asarray(ab["m"], jnp.float32).reshape(shape[1])
    if layer is not None:
      if mag is not None:
        errors.append(
            f"{module}: a DoRA adapter (use_dora) onto stacked (scanned)"
            " layers is not supported yet; load the base model with"
            " scan_layers=False for DoRA adapters.")
        continue
      stacked.setdefault(idx, {})[layer] = (a, b, rank, alpha)
      continue
    nodes[idx] = LoraWeight(
        a=jnp.asarray(a.T, jnp.float32), b=jnp.asarray(b.T, jnp.float32),
        alpha=alpha, axes="io", rslora=use_rslora, magnitude=mag,
    )
  for idx, per_layer in stacked.items():
    node = _stack_layers(paths_lib.path_str(flat[idx][0]),
                         tuple(flat[idx][1].shape), per_layer, use_rslora,
                         errors)
    nodes[idx] = node
  if errors:
    raise ValueError(
        f"The PEFT adapter in {directory!r} does not fit these params:\n- "
        + "\n- ".join(errors)
    )
  return jax.tree_util.tree_unflatten(treedef, nodes)


# -- VeRA ----------------------------------------------------------------------

_VERA_KEY_RE = re.compile(r"(.+)\.vera_lambda_([bd])(?:\.([^.]+))?")


def _save_vera(directory: str, flat, *, name_map: NameMap, overwrite: bool,
               metadata: Mapping[str, Any]) -> None:
  """Writes a tree of `VeraWeight`s in PEFT's VERA format."""
  nodes = [(p, n) for p, n in flat if n is not None]
  other = [p for p, n in nodes if not isinstance(n, VeraWeight)]
  if other:
    raise ValueError(
        "The adapter mixes VeraWeight and other nodes; a PEFT directory has"
        f" one peft_type. Non-VeRA nodes: {other[:4]}.")
  if os.path.exists(directory) and os.listdir(directory) and not overwrite:
    raise ValueError(
        f"{directory!r} exists and is not empty; pass `overwrite=True` to"
        " replace it, or choose a new directory.")
  ranks = {n.rank for _, n in nodes}
  if len(ranks) != 1:
    raise ValueError(f"VeRA nodes have different ranks {sorted(ranks)}; PEFT"
                     " shares one pair of projections of one rank.")
  # The shared projections: the largest slices, checked against the others.
  big_a = max((n for _, n in nodes), key=lambda n: n.a.shape[0]).a
  big_b = max((n for _, n in nodes), key=lambda n: n.b.shape[1]).b
  big_a, big_b = np.asarray(big_a), np.asarray(big_b)
  tensors, modules, errors = {}, [], []
  for path, n in nodes:
    module = _module_name(path, name_map)
    if module is None:
      errors.append(f"{path!r} has no PEFT module name; pass `name_map`")
      continue
    a, b = np.asarray(n.a), np.asarray(n.b)
    if not (np.array_equal(a, big_a[:a.shape[0]])
            and np.array_equal(b, big_b[:, :b.shape[1]])):
      errors.append(
          f"{path!r}: its projections are not slices of one shared pair,"
          " which PEFT's VERA format requires (make the adapter with"
          " `lorajax.init(params, lorajax.VeraConfig(...), key=...)`)")
      continue
    modules.append(module)
    tensors[f"{_PREFIX}{module}.vera_lambda_b"] = np.asarray(n.lambda_b)
    tensors[f"{_PREFIX}{module}.vera_lambda_d"] = np.asarray(n.lambda_d)
  if errors:
    raise ValueError("Cannot save the VeRA adapter:\n- "
                     + "\n- ".join(errors))
  tensors["base_model.vera_A"] = np.ascontiguousarray(big_a.T)
  tensors["base_model.vera_B"] = np.ascontiguousarray(big_b.T)
  short = sorted({m.rsplit(".", 1)[-1] for m in modules})
  config = {
      "peft_type": "VERA", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": None, "revision": None,
      "r": ranks.pop(), "target_modules": short,
      "projection_prng_key": int(nodes[0][1].seed), "save_projection": True,
      "vera_dropout": 0.0, "d_initial": 0.1, "fan_in_fan_out": False,
      "bias": "none", "modules_to_save": None, "init_weights": True,
      "layers_to_transform": None, "layers_pattern": None,
      "inference_mode": True,
  }
  header = {"format": "pt"}
  for k, v in metadata.items():
    if k in _CONFIG_KEYS:
      config[k] = v
    else:
      header[k] = v if isinstance(v, str) else json.dumps(v)
  # Modules whose short name also names unadapted modules: list in full.
  all_modules = {_module_name(p, name_map) for p, n in flat if n is None}
  if any(m and m.rsplit(".", 1)[-1] in short for m in all_modules):
    config["target_modules"] = sorted(modules)

  def write(tmp: str) -> None:
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
      json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata=header)

  fileio.write_dir_atomic(directory, write)


def _load_vera(directory: str, cfg: Mapping[str, Any], w_path: str,
               params: PyTree, *, name_map: NameMap) -> PyTree:
  """Reads PEFT's VERA format into a tree of `VeraWeight`s."""
  if not cfg.get("save_projection", True):
    raise ValueError(
        f"{directory!r}: save_projection=false, so the shared vera_A/vera_B"
        " are not in the file and PEFT regenerates them with torch's RNG from"
        " projection_prng_key, which JAX cannot reproduce. Re-save in PEFT"
        " with save_projection=True.")
  lambdas: dict[str, dict[str, np.ndarray]] = {}
  shared, bad = {}, []
  with safetensors_io.SafetensorsFile(w_path) as f:  # reads bfloat16
    for key in f.keys():  # noqa: SIM118
      if key in ("base_model.vera_A", "base_model.vera_B") or re.fullmatch(
          r"base_model\.vera_[AB]\.[^.]+", key):
        shared[key.split(".")[1]] = np.asarray(f.get_tensor(key))
        continue
      m = _VERA_KEY_RE.fullmatch(key)
      if not key.startswith(_PREFIX) or m is None:
        bad.append(key)
        continue
      lambdas.setdefault(m.group(1)[len(_PREFIX):], {})[m.group(2)] = (
          f.get_tensor(key))
  if bad:
    raise ValueError(f"{w_path} holds tensors that are not VeRA vectors or"
                     f" projections: {bad[:6]}.")
  if set(shared) != {"vera_A", "vera_B"}:
    raise ValueError(f"{w_path} lacks base_model.vera_A / vera_B.")
  pa = jnp.asarray(shared["vera_A"].T, jnp.float32)   # (max_in, r)
  pb = jnp.asarray(shared["vera_B"].T, jnp.float32)   # (r, max_out)
  r = int(cfg.get("r", pa.shape[1]))
  if pa.shape[1] != r or pb.shape[0] != r:
    raise ValueError(f"{w_path}: vera_A {shared['vera_A'].shape} / vera_B"
                     f" {shared['vera_B'].shape} do not have rank r={r}.")
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  by_module = {}
  for idx, (kp, _) in enumerate(flat):
    mname = _module_name(paths_lib.path_str(kp), name_map)
    if mname is not None:
      by_module[mname] = idx
  nodes: list[Any] = [None] * len(flat)
  errors = []
  for module, lam in lambdas.items():
    if set(lam) != {"b", "d"} or module not in by_module:
      errors.append(f"{module}: needs vera_lambda_b and vera_lambda_d and a"
                    " weight in `params` with this module name")
      continue
    idx = by_module[module]
    shape = tuple(flat[idx][1].shape)
    if (len(shape) != 2 or shape[0] > pa.shape[0] or shape[1] > pb.shape[1]
        or lam["b"].shape != (shape[1],) or lam["d"].shape != (r,)):
      errors.append(f"{module}: weight {shape} does not fit lambda_b"
                    f" {lam['b'].shape}, lambda_d {lam['d'].shape}, vera_A"
                    f" {shared['vera_A'].shape}, vera_B"
                    f" {shared['vera_B'].shape}")
      continue
    nodes[idx] = VeraWeight(
        lambda_d=jnp.asarray(lam["d"], jnp.float32),
        lambda_b=jnp.asarray(lam["b"], jnp.float32),
        a=pa[:shape[0]], b=pb[:, :shape[1]],
        seed=int(cfg.get("projection_prng_key", 0)))
  if errors:
    raise ValueError(
        f"The PEFT VeRA adapter in {directory!r} does not fit these"
        " params:\n- " + "\n- ".join(errors))
  return jax.tree_util.tree_unflatten(treedef, nodes)
