"""DoRA and VeRA as adapter kinds of the factored interpreter.

* **DoRA** (a `LoraWeight` with a `magnitude`): the value is
  `g * (base + scale * a @ b)` with `g = m / stop_gradient(||W + s a b||)` per
  output unit. `g` is computed once per call from `W`, `a` and `b` without any
  weight-shaped array (`adapter.dora_norm`: `||W_o||^2`, `W^T a` and the
  `r x r` Gram matrix) and becomes a third part of the value with mask `"so"`
  (the weight's stacked and output axes), so every structural op moves it as
  it moves `b`. Where the value meets a `dot_general` (an embedding `gather`),
  the LoRA rule computes `x W + s (x a) b` and the result is multiplied by `g`
  laid out on the output's axes: PEFT's DoRA forward, without PEFT's dense
  `W + s B A`. Uses that contract an output axis, convolutions, `ragged_dot`
  and fused concatenations fall back to the merged weight (reported).
* **VeRA** (`VeraWeight`): the trained vectors are folded into the frozen
  projections, `(a * lambda_d, b * lambda_b)`, giving a LoRA of scale 1 that
  runs through every LoRA rule; the projections are not trainable
  (`trainable`), so the interpreter feeds them through `stop_gradient`.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lorajax._src.core import jax_compat as jc
from lorajax._src.core.adapter import (
    LoraWeight,
    VeraWeight,
    check_node,
    check_vera,
    factors,
    out_scale,
)
from lorajax._src.core.extend import (
    AdapterKind,
    Factored,
    Use,
    dense,
    register_adapter_kind,
)
from lorajax._src.core.lora_kind import LORA, MASKS, lookup

DORA_MASKS = ("si", "so", "so")


def _plain(v: Factored) -> Factored:
  """The LoRA part of a DoRA value (without `g`)."""
  return v.replace(parts=v.parts[:2], masks=MASKS, kind=LORA)


def _with(use: Use, v: Factored) -> Use:
  ops = list(use.operands)
  ops[use.position] = v
  return dataclasses.replace(use, operands=tuple(ops))


class DoraKind(AdapterKind):
  """DoRA: `m * (W + s a b) / ||W + s a b||` (Liu et al. 2024)."""

  name = "dora"

  def factored(self, node: LoraWeight, base: Any, path: str) -> Factored:
    plain = LORA.factored(
        dataclasses.replace(node, magnitude=None), base, path)
    g = out_scale(dense(base), node)  # (*stack, *out), stop-gradient norm
    assert g is not None  # `node` has a magnitude
    axes = node.axes
    src = ([j for j, c in enumerate(axes) if c == "s"]
           + [j for j, c in enumerate(axes) if c == "o"])
    g = jnp.transpose(g, [src.index(j) for j in sorted(src)])
    return Factored(base, (*plain.parts, g), axes, DORA_MASKS, self,
                    plain.meta, path)

  def check(self, node, shape, path):
    return check_node(node, shape, path)

  def materialize(self, v: Factored) -> jax.Array:
    base = dense(v.base)
    held = v.held(2)
    g = jnp.reshape(v.parts[2], [n if j in held else 1
                                 for j, n in enumerate(v.shape)])
    merged = (base.astype(jnp.float32) + LORA.delta(_plain(v))) * g
    return merged.astype(base.dtype)

  def dot_general(self, v: Factored, use: Use) -> jax.Array | None:
    (lc, rc), (lb, rb) = jc.dot_dims(use.params)
    lhs_is_w = use.position == 0
    w_con, w_bat = (lc, lb) if lhs_is_w else (rc, rb)
    held = v.held(2)
    x = use.operands[1 - use.position]
    if any(j in w_con for j in held):
      # An output axis is contracted (a tied head `h @ E.T`): `g` scales
      # the activation's matching axes instead, if it sits on no free axis.
      x_con, x_bat = (rc, rb) if lhs_is_w else (lc, lb)
      where = dict(zip(w_con + w_bat, x_con + x_bat))
      if not all(j in where for j in held):
        return None
      xs = _scale_out(x.astype(jnp.float32), v.parts[2],
                      [where[j] for j in held]).astype(x.dtype)
      ops = list(use.operands)
      ops[1 - use.position], ops[use.position] = xs, _plain(v)
      return LORA.dot_general(_plain(v), dataclasses.replace(
          use, operands=tuple(ops)))
    y = LORA.dot_general(_plain(v), _with(use, _plain(v)))
    # Where each weight axis lands in the output: batch axes first, then the
    # free axes of the lhs, then those of the rhs.
    w_free = [j for j in range(v.ndim) if j not in w_con and j not in w_bat]
    n_x_free = x.ndim - len(lc if not lhs_is_w else rc) - len(w_bat)
    start = len(w_bat) + (0 if lhs_is_w else n_x_free)
    pos = {j: k for k, j in enumerate(w_bat)}
    pos.update({j: start + k for k, j in enumerate(w_free)})
    return _scale_out(y, v.parts[2], [pos[j] for j in held])

  def gather(self, v: Factored, use: Use) -> jax.Array | None:
    # An embedding lookup: the gathered rows of `W`, `a`, `b` and `g` are
    # merged by `materialize` (so `g` scales whichever axis it sits on).
    return lookup(v, use)


def _scale_out(y: jax.Array, g: jax.Array, positions: list[int]
               ) -> jax.Array:
  """`y * g`, `g`'s axes placed at `positions` of `y`."""
  order = sorted(range(len(positions)), key=lambda k: positions[k])
  g = jnp.transpose(g, order)
  g = lax.broadcast_in_dim(g, y.shape, tuple(sorted(positions)))
  return (y.astype(jnp.float32) * g).astype(y.dtype)


class VeraKind(AdapterKind):
  """VeRA: a LoRA of scale 1 with factors `(a * lambda_d, b * lambda_b)`."""

  name = "vera"

  def factored(self, node: VeraWeight, base: Any, path: str) -> Factored:
    a, b, _ = factors(node)
    return LORA.factored(LoraWeight(a=a, b=b, alpha=float(node.rank)),
                         base, path)

  def check(self, node, shape, path):
    return check_vera(node, shape, path)

  def trainable(self, node: VeraWeight) -> Any:
    return VeraWeight(lambda_d=True, lambda_b=True,  # type: ignore[arg-type]
                      a=False, b=False,  # type: ignore[arg-type]
                      seed=node.seed, axes=node.axes)


DORA = DoraKind()
VERA = VeraKind()
register_adapter_kind(VeraWeight, VERA)
