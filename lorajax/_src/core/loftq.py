"""LoftQ: quantize a base and start its adapter on the quantization error.

References:
  Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large
  Language Models" (arXiv 2310.08659); PEFT's `loftq_init`.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lorajax._src.core import paths as paths_lib
from lorajax._src.core import quant as quant_lib
from lorajax._src.core.adapter import LoraWeight, init
from lorajax._src.core.config import LoraConfig

PyTree = Any


def _loftq_one(w: jax.Array, *, fmt: str, axis: int, double_quant: bool,
               rank: int, scale: float, iters: int, path: str):
  """PEFT's alternation for one `(in, out)` weight: `(q, a, b)`."""
  w = jnp.asarray(w, jnp.float32)
  res = w
  q = a = b = None
  for _ in range(iters):
    q = quant_lib.quantize_array(res, fmt, axis=axis,
                                 double_quant=double_quant, path=path)
    err = w - quant_lib.dequantize(q, jnp.float32)
    u, s, vh = jnp.linalg.svd(err, full_matrices=False)
    root = jnp.sqrt(s[:rank])
    # `scale * a @ b` is the rank-`rank` part of the error: sqrt(S) goes to
    # each side (PEFT's split), divided by sqrt(scale).
    a = u[:, :rank] * root / math.sqrt(scale)
    b = (root[:, None] * vh[:rank]) / math.sqrt(scale)
    res = w - scale * (a @ b)
  return q, a, b


def loftq(params: PyTree, config: LoraConfig,
          formats: str | Mapping[str, str | None] = "nf4", *,
          key: jax.Array, iters: int = 1, double_quant: bool = False,
          min_size: int = 4096) -> tuple[PyTree, PyTree]:
  """Quantizes `params` and initialises the adapter with LoftQ.

  For each adapted weight `W` (two axes, `io`) that is quantized, `iters`
  times (PEFT's `loftq_iter`, default 1): `Q = quantize(W - scale * a @ b)`
  (the first time `Q = quantize(W)`), then `a`, `b` from the rank-`r` SVD of
  the residual `W - dequantize(Q) = U S V^T`: `a = U_r sqrt(S_r) /
  sqrt(scale)`, `b = sqrt(S_r) V_r^T / sqrt(scale)`. So `dequantize(Q) +
  scale * a @ b` is closer to `W` than `dequantize(quantize(W))` is, and
  training starts there. PEFT stores `lora_A = sqrt(S) V^T` and `lora_B = U
  sqrt(S)` without the `1 / sqrt(scale)`, which is the same only when
  `alpha == r`; here the adapted weight is right for any `alpha`.

  Other weights are quantized as `lorajax.quantize` does, and their adapters
  (if any) are initialised as `lorajax.init` does.

  Args:
    params: Dense float params.
    config: The LoRA config.
    formats: As for `lorajax.quantize`.
    key: PRNG key for the adapters that are not LoftQ-initialised.
    iters: Number of alternations (>= 1).
    double_quant: NF4 double quantization.
    min_size: As for `lorajax.quantize`.

  Returns:
    `(qparams, adapter)`.

  Raises:
    ValueError: For `iters < 1`, or anything `lorajax.quantize` or
      `lorajax.init` rejects.
  """
  if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
    raise ValueError(f"`iters` must be an int >= 1; got {iters!r}.")
  qparams = quant_lib.quantize(params, formats, double_quant=double_quant,
                               min_size=min_size)
  adapter = init(params, config, key=key)
  plans = config.plan(params)
  q_flat, q_def = jax.tree_util.tree_flatten_with_path(
      qparams, is_leaf=quant_lib.is_quantized)
  w_leaves = jax.tree.leaves(params)
  a_nodes = jax.tree.leaves(adapter, is_leaf=lambda x: x is None or
                            isinstance(x, LoraWeight))
  new_q, new_a = [], []
  for (kp, q), w, node in zip(q_flat, w_leaves, a_nodes):
    path = paths_lib.path_str(kp)
    plan = plans.get(path)
    if (plan is None or node is None or not quant_lib.is_quantized(q)
        or plan.axes != "io"):
      new_q.append(q)
      new_a.append(node)
      continue
    q2, a, b = _loftq_one(
        w, fmt=q.format, axis=q.axis, double_quant=q.double_quant,
        rank=plan.rank, scale=plan.scale, iters=iters, path=path)
    new_q.append(dataclasses.replace(q2, dtype=q.dtype))
    new_a.append(dataclasses.replace(node, a=a.astype(node.a.dtype),
                                     b=b.astype(node.b.dtype)))
  return (jax.tree_util.tree_unflatten(q_def, new_q),
          jax.tree_util.tree_unflatten(
              jax.tree.structure(adapter, is_leaf=lambda x: x is None or
                                 isinstance(x, LoraWeight)), new_a))
