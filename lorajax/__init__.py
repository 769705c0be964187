"""lorajax: functional LoRA fine-tuning for JAX."""

from lorajax import peft
from lorajax._src.core.adapter import (
    LoraWeight,
    VeraWeight,
    delta,
    init,
    is_lora,
    merge,
    unmerge,
)
from lorajax._src.core.checkpoint import CheckpointManager
from lorajax._src.core.config import LoraConfig, WeightPlan
from lorajax._src.core.factored import (
    LoraFallbackError,
    LoraFallbackWarning,
    infer_axes,
    lora,
)
from lorajax._src.core.methods import VeraConfig, decompose, eva_init
from lorajax._src.core.optim import decay_mask, lora_plus
from lorajax._src.core.paths import path_str
from lorajax._src.core.sharding import (
    adapter_shardings,
    global_batch,
    init_sharded,
)
from lorajax._src.core.summary import Summary, summary
from lorajax._src.core.train import TrainStep, make_train_step

__version__ = "0.1.0"

__all__ = (
    "CheckpointManager",
    "LoraConfig",
    "LoraFallbackError",
    "LoraFallbackWarning",
    "LoraWeight",
    "Summary",
    "TrainStep",
    "VeraConfig",
    "VeraWeight",
    "WeightPlan",
    "adapter_shardings",
    "decay_mask",
    "decompose",
    "delta",
    "eva_init",
    "global_batch",
    "infer_axes",
    "init",
    "init_sharded",
    "is_lora",
    "lora",
    "lora_plus",
    "make_train_step",
    "merge",
    "path_str",
    "peft",
    "summary",
    "unmerge",
)
