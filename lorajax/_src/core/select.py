"""Selection by use: the weights a model uses as linear maps.

`select_linear(fn, params, *args)` traces `fn` once (abstractly) and walks its
jaxpr with the walker of `infer_axes` (the rule table and layout transfers of
`lorajax.lora`), so a weight counts as linear exactly when `lorajax.lora`
would factor its matmul. On top of the weight tracking it follows, for every
value, whether it depends on `fn`'s array arguments (an activation) and which
weights' matmul outputs it still is, to find the output head.
"""

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from lorajax._src.core import jax_compat as jc
from lorajax._src.core import layouts
from lorajax._src.core import paths as paths_lib
from lorajax._src.core.factored import _AxesWalker, _is_lazy, _trace

PyTree = Any

_LINEAR_USES = ("dot_general", "ragged_dot_general")


@dataclasses.dataclass(frozen=True)
class _Flow:
  """What a value is, for finding the head.

  Attributes:
    dep: It depends on `fn`'s array arguments (an activation).
    dots: The weights whose matmul output this value still is: carried
      through ops whose other operands are weights, constants or the same
      matmul's output (casts, reshapes, a bias, a softcap, a norm), cleared
      where it meets another activation (a residual add, attention).
  """

  dep: bool
  dots: frozenset[str] = frozenset()


_CONST = _Flow(False)
_CALLS = ("call", "remat", "custom")


def _mix(flows: list[_Flow]) -> _Flow:
  deps = [f for f in flows if f.dep]
  if not deps:
    return _CONST
  dots = deps[0].dots
  return _Flow(True, dots if all(f.dots == dots for f in deps) else
               frozenset())


class _UseWalker(_AxesWalker):
  """`infer_axes`'s walker, also recording each weight's kind of use."""

  def __init__(self):
    super().__init__()
    self.linear: dict[str, set[str]] = {}
    self.gathered: set[str] = set()
    self.pairs: set[str] = set()  # in a matmul with another weight
    self.convs: set[str] = set()
    self._flows_in: list[list[_Flow]] = []
    self._flows_out: list[_Flow] | None = None

  def walk(self, jaxpr, ins):
    n = len(jaxpr.invars)
    pending = self._flows_in[-1] if self._flows_in else []
    if len(pending) >= n:
      flows_in = pending[len(pending) - n:]
    else:
      flows_in = [_Flow(any(f.dep for f in pending))] * n
    env: dict[Any, Any] = {}
    flow: dict[Any, _Flow] = {}

    def read(v):
      return None if jc.is_literal(v) else env.get(v)

    def flow_of(v):
      return _CONST if jc.is_literal(v) else flow.get(v, _CONST)

    for v, x, f in zip(jaxpr.invars, ins, flows_in):
      env[v] = x
      flow[v] = f
    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      in_flows = [flow_of(v) for v in eqn.invars]
      out_flows = None
      if any(x is not None for x in invals):
        self._flows_in.append(in_flows)
        self._flows_out = None
        try:
          outs, out_flows = self._eqn(eqn, invals, in_flows)
        finally:
          self._flows_in.pop()
        for v, x in zip(eqn.outvars, outs):
          if not jc.is_dropvar(v):
            env[v] = x
      if out_flows is None or len(out_flows) != len(eqn.outvars):
        out_flows = [_mix(in_flows)] * len(eqn.outvars)
      for v, f in zip(eqn.outvars, out_flows):
        if not jc.is_dropvar(v):
          flow[v] = f
    self._flows_out = [flow_of(v) for v in jaxpr.outvars]
    return [read(v) for v in jaxpr.outvars]

  def _eqn(self, eqn, invals, in_flows):
    rule = self.rules.get(eqn.primitive)
    name = None if rule is None else rule.name
    out_flows = None
    weights = [(k, x) for k, x in enumerate(invals) if x is not None]
    if name in _LINEAR_USES:
      if len(weights) == 1:
        k, x = weights[0]
        if layouts.USE_ROLES[name](eqn, k) is not None:
          paths = frozenset(path for path, _ in x)
          for path in paths:
            self.linear.setdefault(path, set()).add(name)
          dep = any(f.dep for j, f in enumerate(in_flows) if j != k)
          out_flows = [_Flow(dep, paths)]
      else:
        self.pairs.update(path for _, x in weights for path, _ in x)
    elif name == "gather" and invals[0] is not None and (
        layouts.USE_ROLES[name](eqn, 0) is not None
        or layouts.STRUCTURAL[name](eqn, None) is None):
      # An embedding lookup: rows picked by token ids. A gather that only
      # indexes stacked axes (`w[expert_ids]`) is a structural op instead.
      self.gathered.update(path for path, _ in invals[0])
    elif name == "conv_general_dilated":
      self.convs.update(path for _, x in weights for path, _ in x)
    outs = self.eqn(eqn, invals)
    if out_flows is None and rule is not None and rule.category in _CALLS:
      out_flows = self._flows_out
    return outs, out_flows


def trace_uses(fn: Callable[..., Any], params: PyTree, args: tuple,
               kwargs: dict) -> dict[str, tuple[bool, str]]:
  """For every floating weight with >= 2 axes: `(selected, why)`.

  The engine of `select_linear`; `why` says how the weight was used.
  """
  flat = paths_lib.leaves_with_paths(params, is_leaf=_is_lazy)
  wanted = {}
  for path, leaf in flat:
    shape = tuple(getattr(leaf, "shape", ()))
    dtype = getattr(leaf, "dtype", None)
    if (len(shape) >= 2 and dtype is not None
        and jnp.issubdtype(dtype, jnp.floating)):
      wanted[path] = len(shape)
  closed, _, _, dyn = _trace(fn, params, args, kwargs)
  ins = [((path, [frozenset({j}) for j in range(wanted[path])]),)
         if path in wanted else None for path, _ in flat]
  walker = _UseWalker()
  walker._flows_in.append(  # noqa: SLF001
      [_CONST] * len(flat) + [_Flow(True)] * len(dyn))
  walker.walk(closed.jaxpr, [*ins, *[None] * len(dyn)])
  heads: set[str] = set()
  for f in walker._flows_out or ():  # noqa: SLF001
    heads |= f.dots
  out = {}
  for path in wanted:
    uses = walker.linear.get(path)
    if path in walker.gathered:
      out[path] = (False, "embedding table (gathered by index"
                   + (", and used in a matmul: tied)" if uses else ")"))
    elif path in heads:
      out[path] = (False, "output head (its matmul gives an output of `fn`)")
    elif uses:
      out[path] = (True, "weight operand of " + ", ".join(
          f"`{u}`" for u in sorted(uses)))
    elif path in walker.convs:
      out[path] = (False, "convolution kernel (name it in `targets` to adapt"
                   " it)")
    elif path in walker.pairs:
      out[path] = (False, "in a matmul with another weight only")
    else:
      out[path] = (False, "not used as a matmul weight (through the ops"
                   " `lorajax.lora` follows)")
  return out


def select_linear(fn: Callable[..., Any], params: PyTree, *args: Any,
                  **kwargs: Any) -> tuple[str, ...]:
  """The weights `fn` uses as linear maps, as `LoraConfig` targets.

  Selection by use rather than by name: `fn(params, *args, **kwargs)` is
  traced once (abstractly; `jax.ShapeDtypeStruct` leaves work) and each
  floating-point weight with at least two axes is followed through the ops
  `lorajax.lora` follows (casts, reshapes, transposes, slices, stacked-axis
  indexing, `jit`, `scan`, `remat`, `cond`, `while`). A weight is selected
  when it is one operand of a `dot_general` (any einsum or matmul, either
  side) or the right-hand operand of a `ragged_dot` (MoE experts) whose
  other operand is an activation, except:

  * embedding tables: weights read by an embedding lookup (a `gather` of
    rows by index), including a table tied to the output head;
  * the output head: a weight whose matmul result becomes an output of `fn`
    without meeting another activation on the way (casts, reshapes, a bias,
    a softcap or a norm are allowed; a residual add is not). So pass the
    function that returns the logits, not the loss; for a stack of layers
    with no residual and no head, the last layer counts as the head.

  Convolution kernels, weights used only together with another weight and
  weights used only by ops `lorajax.lora` does not factor are not selected.

  Example:
    >>> targets = lorajax.select_linear(model.apply, params, tokens)
    >>> config = lorajax.LoraConfig(rank=8, targets=targets)

  Args:
    fn: The model function, `fn(params, *args, **kwargs)`, returning the
      model's outputs (logits).
    params: The base params (arrays or `jax.ShapeDtypeStruct`).
    *args: Example positional inputs of `fn`.
    **kwargs: Example keyword inputs of `fn`.

  Returns:
    One regex per selected weight (its path, escaped), in flattening order:
    pass the tuple as `LoraConfig(targets=...)`.

  Raises:
    ValueError: If no weight is used as a linear map; the message lists how
      each weight was used.
  """
  uses = trace_uses(fn, params, args, kwargs)
  chosen = tuple(re.escape(p) for p, (ok, _) in uses.items() if ok)
  if not chosen:
    rows = [f"{p}: {why}" for p, (_, why) in uses.items()]
    raise ValueError(
        "select_linear found no weight that `fn` uses as a linear map (a"
        " `dot_general` or `ragged_dot` operand next to an activation)."
        " Weights with >= 2 axes:\n" + paths_lib.format_paths(rows, 24)
        + "\nCheck that `fn(params, *args)` runs the model on the example"
        " inputs, or name the targets by regex or preset."
    )
  return chosen
