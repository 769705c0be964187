"""optax glue: LoRA+ learning rates and weight-decay masks for adapters."""

from collections.abc import Callable
from typing import Any

import jax
import optax

from lorajax._src.core.adapter import LoraWeight, VeraWeight, is_lora
from lorajax._src.core.typing import PyTree


def labels(tree: PyTree) -> PyTree:
  """Labels adapter leaves `"a"`, `"b"`, `"m"` (DoRA magnitude), `"vec"`
  (VeRA's trained vectors) or `"frozen"` (VeRA's shared projections); other
  leaves `"other"`."""

  def one(x):
    if isinstance(x, LoraWeight):
      return LoraWeight(a="a", b="b", alpha=x.alpha, axes=x.axes,
                        rslora=x.rslora,
                        magnitude=None if x.magnitude is None else "m")
    if isinstance(x, VeraWeight):
      return VeraWeight(lambda_d="vec", lambda_b="vec", a="frozen",
                        b="frozen", seed=x.seed, axes=x.axes)
    return "other"

  return jax.tree.map(one, tree, is_leaf=is_lora)


def decay_mask(tree: PyTree) -> PyTree:
  """True on every trained adapter array, False on any other leaf.

  Trained adapter arrays are `a`, `b`, DoRA's `magnitude` (PEFT's AdamW
  decays it too) and VeRA's `lambda_d`/`lambda_b`; VeRA's frozen shared
  projections are False. Pass it as the `mask` of a weight-decaying optimizer
  when the trainable tree holds more than adapters (norm scales, biases, a
  new head), and always with VeRA adapters (whose frozen projections are
  leaves with zero gradients that weight decay would otherwise shrink):
  `optax.adamw(lr, weight_decay=0.01, mask=lorajax.optim.decay_mask)`.

  Args:
    tree: A pytree that contains adapter nodes (and possibly other leaves).

  Returns:
    A pytree of bools with the structure of `tree`.
  """
  return jax.tree.map(lambda label: label in ("a", "b", "m", "vec"),
                      labels(tree))


def lora_plus(
    learning_rate: float | optax.Schedule,
    ratio: float = 16.0,
    *,
    optimizer: Callable[..., optax.GradientTransformation] = optax.adamw,
    **kwargs: Any,
) -> optax.GradientTransformation:
  """LoRA+: the same optimizer for `a` and `b`, with `b`'s rate times `ratio`.

  Args:
    learning_rate: The learning rate (or schedule) of the `a` matrices.
    ratio: `b`'s learning rate over `a`'s (Hayou et al. 2024 use 16-20).
    optimizer: An optax optimizer factory taking `learning_rate` first.
    **kwargs: Further arguments for `optimizer` (`weight_decay`, `b1`...).

  Returns:
    An `optax.GradientTransformation` over the adapter tree. Leaves that are
    not adapter matrices (DoRA magnitudes, VeRA vectors, other leaves) get
    `a`'s learning rate; VeRA's frozen projections are not updated.

  References:
    Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models".
  """
  if not ratio > 0:
    raise ValueError(f"`ratio` must be > 0; got {ratio}.")
  lr_b: optax.ScalarOrSchedule
  if callable(learning_rate):
    lr_b = lambda step: ratio * learning_rate(step)  # noqa: E731
  else:
    lr_b = ratio * learning_rate
  tx_a = optimizer(learning_rate, **kwargs)
  return optax.multi_transform(
      {"a": tx_a, "other": tx_a, "m": tx_a, "vec": tx_a,
       "frozen": optax.set_to_zero(), "b": optimizer(lr_b, **kwargs)},
      labels,
  )
