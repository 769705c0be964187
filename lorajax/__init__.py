"""lorajax: functional LoRA fine-tuning for JAX."""

from lorajax import peft
from lorajax._src.adapter import LoraWeight, delta, init, is_lora, merge, unmerge
from lorajax._src.config import LoraConfig, WeightPlan
from lorajax._src.optim import decay_mask, lora_plus
from lorajax._src.paths import path_str
from lorajax._src.summary import Summary, summary

__version__ = "0.1.0"

__all__ = (
    "LoraConfig",
    "LoraWeight",
    "Summary",
    "WeightPlan",
    "decay_mask",
    "delta",
    "init",
    "is_lora",
    "lora_plus",
    "merge",
    "peft",
    "path_str",
    "summary",
    "unmerge",
)
