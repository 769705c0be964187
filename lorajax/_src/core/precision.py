"""Named mixed-precision policies for LoRA fine-tuning.

LoRA trains a small adapter next to a large frozen base. The base is only
read, so it can be stored and multiplied in bfloat16 (half the memory and
HBM traffic of float32); the adapter is updated many times by small steps,
so its master weights and the optimizer moments stay in float32, where an
update of 1e-4 relative is not rounded away. The `"bf16"` policy spells this
out; `"f32"` keeps everything in float32.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lorajax._src.core.config import LoraConfig

PyTree = Any


@dataclasses.dataclass(frozen=True)
class PrecisionPolicy:
  """Which dtype each part of a LoRA training step uses.

  Attributes:
    name: The policy's name (`"f32"` or `"bf16"`).
    param_dtype: Storage dtype of the frozen base weights.
    compute_dtype: Dtype of activations and of the inputs of the base
      matmuls (a model's computation dtype, e.g. `LlamaConfig.dtype`).
    adapter_dtype: Storage dtype of the adapter's `a` and `b` (the master
      weights), hence of their gradients and of the optax moments, which
      follow the params they update.
    output_dtype: Dtype of logits, softmax and loss (and of the reductions
      inside norms and attention softmax).
  """

  name: str
  param_dtype: str
  compute_dtype: str
  adapter_dtype: str = "float32"
  output_dtype: str = "float32"

  def cast_params(self, params: PyTree) -> PyTree:
    """Casts the floating-point leaves of `params` to `param_dtype`.

    Args:
      params: The frozen base params (arrays or `jax.ShapeDtypeStruct`).

    Returns:
      A new pytree; integer and other non-float leaves are left as they are.
    """
    dt = jnp.dtype(self.param_dtype)

    def cast(x):
      if not jnp.issubdtype(getattr(x, "dtype", None) or jnp.int32,
                            jnp.floating):
        return x
      if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, dt, sharding=x.sharding)
      return x.astype(dt)

    return jax.tree.map(cast, params)

  def lora_config(self, config: LoraConfig) -> LoraConfig:
    """`config` with its adapter storage dtype set to `adapter_dtype`.

    Args:
      config: A `LoraConfig`.

    Returns:
      A copy of `config` whose `param_dtype` is this policy's `adapter_dtype`.
    """
    if not isinstance(config, LoraConfig):
      raise TypeError(f"`config` must be a LoraConfig; got {config!r}.")
    return dataclasses.replace(config, param_dtype=self.adapter_dtype)


_POLICIES = {
    "f32": PrecisionPolicy("f32", "float32", "float32"),
    "bf16": PrecisionPolicy("bf16", "bfloat16", "bfloat16"),
}
_ALIASES = {"float32": "f32", "fp32": "f32", "bfloat16": "bf16"}


def precision_policy(name: str) -> PrecisionPolicy:
  """Returns the named mixed-precision policy.

  - `"f32"`: everything in float32.
  - `"bf16"`: the frozen base stored and computed in bfloat16; the adapter
    (master weights, gradients, optimizer state) in float32; logits, softmax
    and loss in float32. With `lorajax.lora` (factored execution) the
    adapter's `x @ a` and `@ b` take the bfloat16 activations and the
    float32 factors, so gradients reach `a` and `b` in float32; merged
    execution instead rounds `W + scale * a @ b` to bfloat16, which loses
    small adapter updates, so prefer factored execution with `"bf16"`.

  Example:
    >>> policy = lorajax.precision_policy("bf16")
    >>> params = policy.cast_params(params)            # frozen base: bf16
    >>> config = policy.lora_config(lorajax.LoraConfig(rank=16))  # adapter f32

  Args:
    name: `"f32"` or `"bf16"` (also `"float32"`, `"fp32"`, `"bfloat16"`).

  Returns:
    The `PrecisionPolicy`.

  Raises:
    ValueError: For an unknown name.
  """
  key = _ALIASES.get(name, name) if isinstance(name, str) else name
  if key not in _POLICIES:
    raise ValueError(
        f"Unknown precision policy {name!r}; expected one of"
        f" {sorted(_POLICIES)} (aliases {sorted(_ALIASES)})."
    )
  return _POLICIES[key]
