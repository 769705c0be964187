"""Hugging Face style checkpoints: config.json + (sharded) safetensors."""

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from lorajax._src.core import fileio, safetensors_io
from lorajax._src.core import paths as paths_lib
from lorajax._src.core.typing import PyTree
from lorajax._src.models import llama as llama_lib
from lorajax._src.models.llama import LlamaConfig

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_LAYER_MODULES = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
    "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
}
_LAYER_NORMS = {"input_layernorm", "post_attention_layernorm"}
# Buffers some exporters save next to the weights; they carry no parameters.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _set(tree: dict, path: list[str], value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def hf_key_to_path(key: str) -> tuple[list[str], bool] | None:
  """Maps an HF weight name to `(lorajax path, transpose?)`, None if unknown."""
  if key == "model.embed_tokens.weight":
    return ["model", "embed_tokens", "embedding"], False
  if key == "model.norm.weight":
    return ["model", "norm", "scale"], False
  if key == "lm_head.weight":
    return ["lm_head", "kernel"], True
  m = _LAYER_RE.fullmatch(key)
  if not m:
    return None
  i, module, kind = m.groups()
  if module in _LAYER_MODULES:
    leaf = "kernel" if kind == "weight" else "bias"
    return ["model", "layers", i, *module.split("."), leaf], kind == "weight"
  if module in _LAYER_NORMS and kind == "weight":
    return ["model", "layers", i, module, "scale"], False
  return None


def _shards(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return sorted({os.path.join(path, v) for v in weight_map.values()})
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single):
    return [single]
  found = sorted(
      os.path.join(path, f) for f in os.listdir(path)
      if f.endswith(".safetensors") and not f.startswith("adapter_")
  )
  if not found:
    raise ValueError(
        f"No model.safetensors, model.safetensors.index.json or *.safetensors"
        f" in {path!r}. Save the model with `save_pretrained(...,"
        " safe_serialization=True)` or `lorajax.models.llama.save_pretrained`"
        " (pytorch_model.bin pickles are not read)."
    )
  return found


def load_params(path: str, config: LlamaConfig, *, dtype: Any) -> PyTree:
  """Reads the safetensors of an HF directory into the lorajax layout."""
  params: dict = {}
  unknown = []
  seen = set()
  for shard in _shards(path):
    with safetensors_io.SafetensorsFile(shard) as f:  # reads bfloat16
      for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
        if _IGNORED.fullmatch(key):
          continue
        mapped = hf_key_to_path(key)
        if mapped is None:
          unknown.append(f"{os.path.basename(shard)}: {key}")
          continue
        dest, transpose = mapped
        if dest[0] == "lm_head" and config.tie_word_embeddings:
          continue
        arr = f.get_tensor(key)
        if transpose:
          arr = arr.T
        _set(params, dest, jnp.asarray(arr, dtype=dtype))
        seen.add(key)
  if unknown:
    raise ValueError(
        f"{path!r} holds weights that a Llama-family model does not have:\n"
        + paths_lib.format_paths(unknown)
        + "\nlorajax.models.llama supports Llama, SmolLM, Mistral and Qwen2"
        " checkpoints without extra modules."
    )
  expected = _expected_keys(config)
  missing = sorted(expected - seen)
  if missing:
    raise ValueError(
        f"{path!r} lacks weights that its config.json implies:\n"
        + paths_lib.format_paths(missing)
        + "\nCheck `num_hidden_layers` and `tie_word_embeddings` in"
        " config.json, or re-save the checkpoint."
    )
  return llama_lib.stack_layers(params) if config.scanned else params


def _expected_keys(config: LlamaConfig) -> set[str]:
  keys = {"model.embed_tokens.weight", "model.norm.weight"}
  if not config.tie_word_embeddings:
    keys.add("lm_head.weight")
  for i in range(config.num_hidden_layers):
    for m in _LAYER_MODULES:
      keys.add(f"model.layers.{i}.{m}.weight")
    for m in _LAYER_NORMS:
      keys.add(f"model.layers.{i}.{m}.weight")
  return keys


def load_config(path: str, *, dtype: Any, scan_layers: bool | None = None,
                remat: str = "none") -> LlamaConfig:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise ValueError(
        f"{path!r} has no config.json. `from_pretrained` needs a Hugging Face"
        " style directory (config.json + *.safetensors) or a .gguf file."
    )
  with open(cfg_path) as f:
    try:
      d = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(
          f"{cfg_path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); the"
          " file is damaged or truncated. Restore it from the original"
          " checkpoint."
      ) from None
  return LlamaConfig.from_hf_dict(d, dtype=dtype, scan_layers=scan_layers,
                                 remat=remat)


def to_hf_state(config: LlamaConfig, params: PyTree) -> dict[str, np.ndarray]:
  """The HF `state_dict` (numpy, `(out, in)` weights) of lorajax params."""
  out = {}
  params = llama_lib.unstack_layers(params)
  m = params["model"]
  emb = m["embed_tokens"]
  out["model.embed_tokens.weight"] = emb.get("embedding", emb.get("weight"))
  out["model.norm.weight"] = m["norm"]["scale"]
  if "lm_head" in params and not config.tie_word_embeddings:
    out["lm_head.weight"] = params["lm_head"]["kernel"].T
  for i, layer in m["layers"].items():
    for mod in _LAYER_MODULES:
      group, name = mod.split(".")
      p = layer[group][name]
      out[f"model.layers.{i}.{mod}.weight"] = p["kernel"].T
      if "bias" in p:
        out[f"model.layers.{i}.{mod}.bias"] = p["bias"]
    for norm in _LAYER_NORMS:
      out[f"model.layers.{i}.{norm}.weight"] = layer[norm]["scale"]
  return {
      k: np.ascontiguousarray(np.asarray(jax.device_get(v)))
      for k, v in out.items()
  }


def save_pretrained(
    directory: str | os.PathLike, config: LlamaConfig, params: PyTree, *,
    overwrite: bool = False,
) -> None:
  """Writes `config.json` + `model.safetensors` in Hugging Face layout.

  The directory is written to a temporary sibling and renamed into place, so
  a failure leaves no half-written checkpoint. `transformers`'
  `AutoModelForCausalLM.from_pretrained(directory)` reads the result.

  Args:
    directory: Target directory; must not exist or be empty unless
      `overwrite`.
    config: The model config.
    params: The params dict (lorajax layout, per-layer or scan-stacked:
      stacked layers are written as Hugging Face's per-layer weights).
    overwrite: Replace an existing non-empty `directory` (the old one is
      removed only once the new one is complete).

  Raises:
    ValueError: If `directory` exists and is not empty and not `overwrite`.
  """
  directory = os.fspath(directory)
  if os.path.exists(directory) and os.listdir(directory) and not overwrite:
    raise ValueError(
        f"{directory!r} exists and is not empty; choose a new directory,"
        " remove it first, or pass `overwrite=True`."
    )
  state = to_hf_state(config, params)
  d = config.to_hf_dict()
  d["torch_dtype"] = str(next(iter(state.values())).dtype)
  def write(tmp: str) -> None:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(d, f, indent=2)
    save_file(state, os.path.join(tmp, "model.safetensors"),
              metadata={"format": "pt"})

  fileio.write_dir_atomic(directory, write)


def read_json(path: str) -> Mapping[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
