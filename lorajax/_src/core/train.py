"""One LoRA train step, optax style: `TrainStep(init, step)`.

`make_train_step(loss_fn, optimizer, ...)` returns a NamedTuple of two pure,
jitted functions with one argument order everywhere in lorajax:

  ts = lorajax.make_train_step(loss_fn, optax.adamw(1e-4))
  opt_state = ts.init(adapter)
  adapter, opt_state, metrics = ts.step(params, adapter, opt_state, batch)

`loss_fn(params, adapter, batch)` is differentiated with respect to the
adapter only (the params are frozen constants). Shardings are optional: with
none the step runs wherever its inputs live (one device); with them the step
is jitted with explicit `in_shardings`/`out_shardings`, the adapter and its
optimizer state keep the adapter's shardings, and the params are never copied.
Gradient accumulation over microbatches runs as a `lax.scan` that sums the
gradients in float32; the adapter and optimizer state are donated.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from lorajax._src.core import explicit
from lorajax._src.core import paths as paths_lib
from lorajax._src.core import sharding as sharding_lib
from lorajax._src.core.typing import PyTree


class TrainStep(NamedTuple):
  """A pair of pure, jitted functions (see `make_train_step`).

  Attributes:
    init: `init(adapter) -> opt_state`: the optimizer state, created on the
      adapter's devices with the adapter's shardings when those are known.
    step: `step(params, adapter, opt_state, batch) -> (adapter, opt_state,
      metrics)`: one optimizer step. `step.lower(...)`, with the same
      arguments as arrays or `jax.ShapeDtypeStruct`s, lowers it ahead of
      time (`.compile()`, `.memory_analysis()`...). `metrics` is a dict
      with `loss` (the step's mean loss), `grad_norm` (global norm of the
      gradient the optimizer received), `weight` (with `weighted=True`: the
      summed weight) and `aux` (with `has_aux=True`).
  """

  init: Callable[[PyTree], PyTree]
  step: Callable[[PyTree, PyTree, PyTree, PyTree],
                 tuple[PyTree, PyTree, dict[str, Any]]]


def _is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, PartitionSpec | Sharding)


def _mesh_of(
    shardings: PyTree,
) -> jax.sharding.Mesh | jax.sharding.AbstractMesh:
  for s in jax.tree.leaves(shardings, is_leaf=_is_spec_leaf):
    if isinstance(s, NamedSharding):
      return s.mesh
  raise ValueError(
      "`adapter_shardings` holds no NamedSharding; build it with"
      " `lorajax.adapter_shardings(param_shardings, adapter)`, or leave it"
      " `None` for a single-device step."
  )


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _opt_shardings(optimizer, abstract_adapter, shardings, replicated):
  """The optimizer state's shardings: the adapter's for per-parameter leaves
  (Adam's moments), replicated for the rest (counts, hyperparameters)."""
  abstract_state = jax.eval_shape(optimizer.init, abstract_adapter)
  return optax.tree_map_params(
      optimizer,
      lambda _, s: s,
      abstract_state,
      shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding) or x is None,
  )


def _split(batch: PyTree, k: int) -> PyTree:
  """`(B, ...)` leaves to `(k, B // k, ...)`: microbatch `i` takes rows
  `i, i + k, i + 2k, ...` (a strided split: with the batch sharded along its
  rows, every microbatch stays spread over all devices, no data moves)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(batch)
  out, bad = [], []
  for path, x in flat:
    n = x.shape[0] if getattr(x, "ndim", 0) else None
    if n is None or n % k:
      bad.append(f"{paths_lib.path_str(path) or '<batch>'}: shape"
                 f" {tuple(getattr(x, 'shape', ()))}")
      continue
    out.append(jnp.swapaxes(x.reshape(n // k, k, *x.shape[1:]), 0, 1))
  if bad:
    raise ValueError(
        f"`accum_steps={k}` splits every batch leaf's leading axis into {k}"
        " microbatches, so it must be divisible by it; these leaves are"
        " not:\n" + paths_lib.format_paths(bad) + "\nPick a batch size that"
        " is a multiple of `accum_steps`, or pass microbatches stacked on a"
        " leading axis with `microbatched=True`."
    )
  return jax.tree_util.tree_unflatten(treedef, out)


def _num_microbatches(batch: PyTree, accum_steps: int) -> int:
  sizes = {x.shape[0] for x in jax.tree.leaves(batch)
           if getattr(x, "ndim", 0)}
  if len(sizes) != 1:
    raise ValueError(
        "With `microbatched=True` every batch leaf has a leading microbatch"
        f" axis of one common size; got leading sizes {sorted(sizes)}."
    )
  (k,) = sizes
  if accum_steps not in (1, k):
    raise ValueError(
        f"`accum_steps={accum_steps}` but the batch holds {k} microbatches"
        " on its leading axis (`microbatched=True`). Leave `accum_steps=1`"
        " to take the number from the batch."
    )
  return k


def make_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    weighted: bool = False,
    accum_steps: int = 1,
    microbatched: bool = False,
    param_shardings: PyTree = None,
    adapter_shardings: PyTree = None,
    batch_sharding: PyTree = None,
    donate: bool = True,
) -> TrainStep:
  """Builds the LoRA train step: `TrainStep(init, step)`.

  `step(params, adapter, opt_state, batch)` computes the gradient of
  `loss_fn(params, adapter, batch)` with respect to the adapter only, applies
  the optax update and returns `(adapter, opt_state, metrics)`. Both
  functions are jitted once (no retrace for inputs of the same shapes) and are
  pure, so they also work inside your own `jax.jit`, `lax.scan` or `jax.vmap`.

  Gradient accumulation: with `accum_steps=k` every batch leaf's leading axis
  is split into `k` microbatches (microbatch `i` takes rows `i::k`); with
  `microbatched=True` the batch leaves already carry a leading microbatch
  axis (`(k, batch, ...)`, e.g. `lorajax.finetune`'s batches) and `k` is its
  size. The microbatches run one after another in a `lax.scan` (peak memory
  of one microbatch); their gradients are summed in float32 and cast back to
  the adapter's dtype before the optimizer sees them. Without `weighted`,
  the loss and the gradient are the mean over microbatches (equal to one big
  batch when `loss_fn` is a mean over equally many rows). With `weighted`,
  `loss_fn` returns a sum and its weight, e.g. the summed token loss and the
  number of tokens; the step divides the summed losses and gradients by the
  summed weight, so accumulation equals one big batch whatever each
  microbatch's token count.

  Shardings (all optional; leave them out on one device): the params stay
  as `param_shardings` says and are never copied or returned; the adapter and
  its optimizer state keep `adapter_shardings` (derived from
  `param_shardings` with `lorajax.adapter_shardings` when only those are
  given) from step to step; the metrics come back replicated. With
  `donate=True` the adapter and optimizer state buffers passed in are reused
  for the outputs: do not use them (or arrays sharing their buffers, such as
  a `jax.device_put` alias) after the call.

  Args:
    loss_fn: `loss_fn(params, adapter, batch) -> loss`, a scalar; `(loss,
      aux)` with `has_aux`; `(loss_sum, weight)` with `weighted`; `((loss_sum,
      weight), aux)` with both. Use `lorajax.lora(forward)(params, adapter,
      x)` or `forward(lorajax.merge(params, adapter), x)` inside.
    optimizer: The optax optimizer for the adapter.
    has_aux: Whether `loss_fn` returns auxiliary data. It comes back as
      `metrics["aux"]`; with accumulation it is stacked on a leading
      microbatch axis.
    weighted: Whether `loss_fn` returns a `(loss_sum, weight)` pair (see
      above); `metrics["weight"]` is the summed weight.
    accum_steps: Microbatches per step, split from the batch's leading axis.
    microbatched: Whether the batch leaves already have a leading microbatch
      axis. Then `accum_steps` must be 1 or equal that axis' size.
    param_shardings: The params' shardings (a `jax.jit` `in_shardings`
      pytree prefix of the params), or `None` to keep them as they come.
    adapter_shardings: From `lorajax.adapter_shardings`, or `None`.
    batch_sharding: The batch's sharding (a pytree prefix of the batch),
      e.g. `NamedSharding(mesh, P("data"))`, or `None`.
    donate: Donate the adapter and optimizer state buffers.

  Returns:
    A `TrainStep(init, step)` pair of functions.

  Raises:
    ValueError: If `accum_steps < 1`, `adapter_shardings` holds no
      `NamedSharding`, or (at the first call) the batch does not split into
      `accum_steps` microbatches.
  """
  if not isinstance(accum_steps, int) or accum_steps < 1:
    raise ValueError(f"`accum_steps` must be an integer >= 1; got"
                     f" {accum_steps!r}.")
  if adapter_shardings is not None:
    _mesh_of(adapter_shardings)  # Fail now on a tree without shardings.
  # Shardings that depend on the adapter's structure, filled on first use.
  state: dict[str, Any] = {}

  def _setup(adapter):
    if "init" in state:
      return
    ash = adapter_shardings
    if ash is None and param_shardings is not None:
      # Derived like `lorajax.adapter_shardings` does (then `param_shardings`
      # must mirror the params; pass `adapter_shardings` for a prefix).
      ash = sharding_lib.adapter_shardings(param_shardings, adapter)
    if ash is not None:
      replicated = NamedSharding(_mesh_of(ash), PartitionSpec())
      osh = _opt_shardings(optimizer, _abstract(adapter), ash, replicated)
      in_sh = (param_shardings, ash, osh, batch_sharding)
      out_sh = (ash, osh, replicated)
      state["init"] = jax.jit(optimizer.init, in_shardings=(ash,),
                              out_shardings=osh)
    else:
      in_sh = (param_shardings, None, None, batch_sharding)
      out_sh = None
      state["init"] = jax.jit(optimizer.init)
    kw = {} if out_sh is None else {"out_shardings": out_sh}
    state["step"] = jax.jit(_step, in_shardings=in_sh,
                            donate_argnums=(1, 2) if donate else (), **kw)

  def _grads(params, adapter, batch):
    """`((loss, (weight, aux)), grads)` of one (micro)batch."""

    def f(ad):
      try:
        out = loss_fn(params, ad, batch)
      except Exception as e:
        if not explicit.is_sharding_type_error(e) or "[lorajax:" in str(e):
          raise
        raise explicit.with_user_hint(e, "`loss_fn`") from e
      aux = None
      if has_aux:
        out, aux = out
      if weighted:
        value, weight = out
      else:
        value, weight = out, None
      return value, (weight, aux)

    return jax.value_and_grad(f, has_aux=True)(adapter)

  def _step(params, adapter, opt_state, batch):
    k = accum_steps
    if microbatched:
      k = _num_microbatches(batch, accum_steps)
    if k == 1 and not microbatched:
      (value, (weight, aux)), grads = _grads(params, adapter, batch)
      if weighted:
        denom = jnp.where(weight > 0, weight, 1).astype(jnp.float32)
        value = value / denom
        grads = jax.tree.map(
            lambda g: (g.astype(jnp.float32) / denom).astype(g.dtype), grads)
    else:
      micro = batch if microbatched else _split(batch, k)

      def body(carry, mb):
        g_acc, v_acc, w_acc = carry
        (v, (w, aux)), g = _grads(params, adapter, mb)
        g_acc = jax.tree.map(lambda x, y: x + y.astype(jnp.float32), g_acc,
                             g)
        v_acc = v_acc + jnp.asarray(v, jnp.float32)
        if weighted:
          w_acc = w_acc + jnp.asarray(w, jnp.float32)
        return (g_acc, v_acc, w_acc), aux

      # Summed in float32 whatever the adapter's storage dtype.
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                           adapter)
      (g_sum, v_sum, w_sum), aux = jax.lax.scan(
          body, (zeros, jnp.float32(0), jnp.float32(0)), micro)
      if weighted:
        weight = w_sum
        denom = jnp.where(w_sum > 0, w_sum, 1.0)
      else:
        weight, denom = None, jnp.float32(k)
      value = v_sum / denom
      grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum,
                           adapter)
    updates, opt_state = optimizer.update(grads, opt_state, adapter)
    adapter = optax.apply_updates(adapter, updates)
    metrics = {"loss": value, "grad_norm": optax.tree.norm(grads)}
    if weighted:
      metrics["weight"] = weight
    if has_aux:
      metrics["aux"] = aux
    return adapter, opt_state, metrics

  def init(adapter: PyTree) -> PyTree:
    _setup(adapter)
    return state["init"](adapter)

  def step(params: PyTree, adapter: PyTree, opt_state: PyTree,
           batch: PyTree) -> tuple[PyTree, PyTree, dict[str, Any]]:
    _setup(adapter)
    return state["step"](params, adapter, opt_state, batch)

  def lower(params: PyTree, adapter: PyTree, opt_state: PyTree,
            batch: PyTree) -> Any:
    """Lowers `step` ahead of time (arrays or `jax.ShapeDtypeStruct`s)."""
    _setup(adapter)
    return state["step"].lower(params, adapter, opt_state, batch)

  # Ahead-of-time: `step.lower(...)` on `jax.ShapeDtypeStruct`s (then
  # `.compile()` for devices that need not be attached, as `lorajax plan`).
  step.lower = lower  # type: ignore[attr-defined]
  return TrainStep(init=init, step=step)
