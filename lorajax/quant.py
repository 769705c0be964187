"""Quantized frozen bases (QLoRA): NF4, int8 and GGUF block formats, LoftQ.

`lorajax.quantize(params, "nf4")` replaces the weights of a float checkpoint
by `QuantizedWeight` nodes (codes and scales as pytree leaves);
`lorajax.lora(fn)` runs `fn` on them, dequantizing each weight blockwise
right at its matmul. See docs/quantized.md.

Example:
  >>> import jax, lorajax
  >>> params = {"kernel": jax.numpy.ones((128, 64))}
  >>> q = lorajax.quantize(params, "nf4")
  >>> q["kernel"]
  QuantizedWeight(nf4, shape=(128, 64), block=64, axis=-2, dtype=float32)
  >>> lorajax.quant.dequantize(q)["kernel"].shape
  (128, 64)
"""

from lorajax._src.core.loftq import loftq
from lorajax._src.core.quant import (
    FORMATS,
    MergedWeight,
    QuantizationWarning,
    QuantizedWeight,
    is_quantized,
    quantize,
)
from lorajax._src.core.quant import dequantize_tree as dequantize

__all__ = (
    "FORMATS",
    "MergedWeight",
    "QuantizationWarning",
    "QuantizedWeight",
    "dequantize",
    "is_quantized",
    "loftq",
    "quantize",
)
