"""lorajax: functional LoRA fine-tuning for JAX.

The core: adapters as a second pytree (`init`, `merge`, `unmerge`, `delta`),
the factored transform `lora(fn)`, the train step, checkpoints, the
summary and the mixed-precision policies (`precision_policy`). Submodules:
`lorajax.peft` (Hugging Face PEFT interop), `lorajax.multi` (many adapters
on one base: per-example adapter ids),
`lorajax.optim` (LoRA+ and weight-decay masks), `lorajax.sharding` (sharded
init, global batches, axes inference), `lorajax.quant` (quantized frozen
bases: NF4, int8, GGUF blocks; LoftQ). The model zoo (`lorajax.models`) and
the fine-tuning application (`lorajax.finetune`) are separate packages with
their own extras (`pip install 'lorajax[models]'`, `'lorajax[finetune]'`).
"""

from lorajax import multi, optim, peft, quant, sharding
from lorajax._src.core.adapter import (
    LoraWeight,
    VeraWeight,
    delta,
    init,
    is_lora,
    is_node,
    merge,
    unmerge,
)
from lorajax._src.core.checkpoint import (
    CheckpointManager,
    CorruptCheckpointError,
)
from lorajax._src.core.config import LoraConfig
from lorajax._src.core.deprecations import deprecation_getattr as _getattr
from lorajax._src.core.factored import (
    LoraFallbackError,
    LoraFallbackWarning,
    lora,
)
from lorajax._src.core.methods import VeraConfig, decompose, eva_init
from lorajax._src.core.precision import precision_policy
from lorajax._src.core.quant import quantize
from lorajax._src.core.select import select_linear
from lorajax._src.core.sharding import adapter_shardings, init_sharded
from lorajax._src.core.summary import summary
from lorajax._src.core.train import TrainStep, make_train_step

__version__ = "0.1.0"

__all__ = (
    "CheckpointManager",
    "CorruptCheckpointError",
    "LoraConfig",
    "LoraFallbackError",
    "LoraFallbackWarning",
    "LoraWeight",
    "TrainStep",
    "VeraConfig",
    "VeraWeight",
    "adapter_shardings",
    "decompose",
    "delta",
    "eva_init",
    "init",
    "init_sharded",
    "is_lora",
    "is_node",
    "lora",
    "make_train_step",
    "merge",
    "multi",
    "optim",
    "peft",
    "precision_policy",
    "quant",
    "quantize",
    "select_linear",
    "sharding",
    "summary",
    "unmerge",
)


def _import(module: str, name: str):
  def get():
    import importlib  # noqa: PLC0415

    return getattr(importlib.import_module(module), name)

  return get


_REMOVED_IN = "0.2.0"


def _moved(name: str, new: str, module: str) -> tuple[str, object]:
  return (f"`lorajax.{name}` is deprecated and will be removed in lorajax"
          f" {_REMOVED_IN}; use `{new}` instead.", _import(module, name))


_DEPRECATIONS = {
    "global_batch": _moved("global_batch", "lorajax.sharding.global_batch",
                           "lorajax._src.core.sharding"),
    "infer_axes": _moved("infer_axes", "lorajax.sharding.infer_axes",
                         "lorajax._src.core.factored"),
    "lora_plus": _moved("lora_plus", "lorajax.optim.lora_plus",
                        "lorajax._src.core.optim"),
    "decay_mask": _moved("decay_mask", "lorajax.optim.decay_mask",
                         "lorajax._src.core.optim"),
    "path_str": (
        "`lorajax.path_str` is deprecated and will be removed in lorajax"
        f" {_REMOVED_IN}; use `jax.tree_util.keystr(keypath, simple=True,"
        " separator='/')` instead (the same string, except that lorajax"
        " drops Flax NNX's trailing `value`).",
        _import("lorajax._src.core.paths", "path_str")),
    "Summary": (
        "`lorajax.Summary` is deprecated and will be removed in lorajax"
        f" {_REMOVED_IN}; it is the type `lorajax.summary(params, adapter)`"
        " returns: use that result's fields and methods, no import needed.",
        _import("lorajax._src.core.summary", "Summary")),
    "WeightPlan": (
        "`lorajax.WeightPlan` is deprecated and will be removed in lorajax"
        f" {_REMOVED_IN}; it is the value type of `LoraConfig.plan(params)`:"
        " read its fields, no import needed.",
        _import("lorajax._src.core.config", "WeightPlan")),
}

__getattr__ = _getattr(__name__, _DEPRECATIONS)
