"""lorajax: functional LoRA fine-tuning for JAX."""

from lorajax import peft
from lorajax._src.core.adapter import LoraWeight, delta, init, is_lora, merge, unmerge
from lorajax._src.core.checkpoint import CheckpointManager
from lorajax._src.core.config import LoraConfig, WeightPlan
from lorajax._src.core.factored import (
    LoraFallbackError,
    LoraFallbackWarning,
    infer_axes,
    lora,
)
from lorajax._src.core.loftq import loftq
from lorajax._src.core.optim import decay_mask, lora_plus
from lorajax._src.core.paths import path_str
from lorajax._src.core.sharding import (
    TrainStep,
    adapter_shardings,
    global_batch,
    init_sharded,
    make_train_step,
)
from lorajax._src.core.quant import QuantizedWeight, quantize
from lorajax._src.core.quant import dequantize_tree as dequantize
from lorajax._src.core.summary import Summary, summary

__version__ = "0.1.0"

__all__ = (
    "CheckpointManager",
    "LoraConfig",
    "LoraFallbackError",
    "LoraFallbackWarning",
    "LoraWeight",
    "QuantizedWeight",
    "Summary",
    "TrainStep",
    "WeightPlan",
    "adapter_shardings",
    "decay_mask",
    "delta",
    "dequantize",
    "global_batch",
    "infer_axes",
    "init",
    "init_sharded",
    "is_lora",
    "loftq",
    "lora",
    "lora_plus",
    "make_train_step",
    "merge",
    "path_str",
    "peft",
    "quantize",
    "summary",
    "unmerge",
)
