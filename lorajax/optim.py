"""optax glue for adapters: LoRA+ learning rates and weight-decay masks.

Example:
  >>> import optax, lorajax
  >>> tx = lorajax.optim.lora_plus(1e-4, ratio=16.0)
  >>> tx = optax.adamw(1e-4, weight_decay=0.01,
  ...                  mask=lorajax.optim.decay_mask)
"""

from lorajax._src.core.optim import decay_mask, lora_plus

__all__ = ("decay_mask", "lora_plus")
