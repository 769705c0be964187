"""PEFT's methods beyond plain LoRA: VeRA, PiSSA / OLoRA, EVA, conversion.

DoRA lives on the adapter node itself (`LoraWeight.magnitude`, see
`adapter.py`). This module holds what needs more than the node:

- `VeraConfig` and its init (frozen shared random projections, trained
  vectors; Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix
  Adaptation");
- `decompose`: PiSSA (Meng et al. 2024) and OLoRA (Büyükakyüz 2024) move the
  top part of each weight into the adapter and return the residual base, in
  one pure call;
- `to_lora`: such an adapter, after training, as a plain LoRA relative to the
  original base (PEFT's `path_initial_model_for_weight_conversion`; the rank
  doubles);
- `eva_init`: EVA (Paischer et al. 2024), `a` from the top right-singular
  vectors of each layer's input activations, by an incremental SVD over
  calibration batches, with optional rank redistribution.
"""

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax._src.core import extend
from lorajax._src.core import jax_compat as jc
from lorajax._src.core import paths as paths_lib
from lorajax._src.core.adapter import (
    LoraWeight,
    VeraWeight,
    _path_key,
    is_node,
    with_magnitude,
)
from lorajax._src.core.config import LoraConfig, WeightPlan

PyTree = Any


# -- VeRA ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeraConfig:
  """Which weights get VeRA adapters (PEFT's `VeraConfig` semantics).

  Every adapted 2-D weight `W` (shape `(d_in, d_out)`) becomes
  `W + (A[:d_in] * lambda_d) @ (B[:, :d_out] * lambda_b)` with one frozen
  random pair `A` (max d_in, rank), `B` (rank, max d_out) shared by all
  adapted weights, `lambda_d` initialised to `d_initial` and `lambda_b` to
  zero (so the adapted model starts equal to the base).

  Attributes:
    rank: The shared projections' rank (PEFT's `r`, default 256).
    targets: As in `LoraConfig` (regexes or a preset).
    exclude: As in `LoraConfig`.
    d_initial: Initial value of every `lambda_d` entry.
    param_dtype: Storage dtype of the vectors and projections.
  """

  rank: int = 256
  targets: str | tuple[str, ...] = "all-linear"
  exclude: str | tuple[str, ...] | None = None
  d_initial: float = 0.1
  param_dtype: Any = "float32"

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int):
      raise TypeError(f"`rank` must be an int; got {self.rank!r}.")
    if self.rank < 1:
      raise ValueError(f"`rank` must be >= 1; got rank={self.rank}.")
    # Validates targets/exclude/dtype the LoraConfig way.
    lc = self._lora_config()
    object.__setattr__(self, "targets", lc.targets)
    object.__setattr__(self, "exclude", lc.exclude)
    object.__setattr__(self, "param_dtype", lc.param_dtype)
    object.__setattr__(self, "d_initial", float(self.d_initial))

  def _lora_config(self) -> LoraConfig:
    return LoraConfig(rank=1, alpha=1.0, targets=self.targets,
                      exclude=self.exclude, param_dtype=self.param_dtype)

  method = "vera"

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict; `VeraConfig(**d)` rebuilds it."""
    d = self._lora_config().to_dict()
    return {"method": "vera", "rank": self.rank, "targets": d["targets"],
            "exclude": d["exclude"], "d_initial": self.d_initial,
            "param_dtype": self.param_dtype}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "VeraConfig":
    """Inverse of `to_dict`."""
    return cls(**{k: v for k, v in d.items() if k != "method"})

  def plan(self, params: PyTree) -> dict[str, WeightPlan]:
    """The targeted weights (as `LoraConfig.plan`); all must be 2-D."""
    try:
      plans = self._lora_config().plan(params)
    except ValueError as e:
      if "more than two axes" not in str(e):
        raise
      raise ValueError(
          "VeRA adapts 2-D (d_in, d_out) weights only, and some targets have"
          " more axes. Narrow `targets` or `exclude` them.\n" + str(e)
      ) from None
    bad = [f"{p!r} {pl.shape} axes {pl.axes!r}" for p, pl in plans.items()
           if pl.axes != "io"]
    if bad:
      raise ValueError(
          "VeRA adapts 2-D (d_in, d_out) weights only; these targets are"
          " not:\n- " + "\n- ".join(bad) + "\nNarrow `targets` or `exclude`"
          " them.")
    return plans


def vera_projections(shape_in: int, shape_out: int, rank: int, *,
                     key: jax.Array, dtype: Any = jnp.float32
                     ) -> tuple[jax.Array, jax.Array]:
  """The shared frozen pair: `a` (shape_in, rank), `b` (rank, shape_out).

  Both are uniform in `+-1/sqrt(fan_in)` as PEFT's kaiming-uniform init of
  `vera_A` (fan in `shape_in`) and `vera_B` (fan in `rank`).
  """
  ka, kb = jax.random.split(key)
  ba, bb = 1.0 / math.sqrt(shape_in), 1.0 / math.sqrt(rank)
  a = jax.random.uniform(ka, (shape_in, rank), jnp.float32, -ba, ba)
  b = jax.random.uniform(kb, (rank, shape_out), jnp.float32, -bb, bb)
  return a.astype(dtype), b.astype(dtype)


def init_vera(params: PyTree, config: VeraConfig, *, key: jax.Array,
              projections: tuple[Any, Any] | None = None,
              seed: int = 0) -> PyTree:
  """VeRA adapter tree (`lorajax.init` with a `VeraConfig` calls this).

  Args:
    params: The base params.
    config: The `VeraConfig`.
    key: PRNG key for the shared projections.
    projections: Optional given `(a, b)` of shapes (>= max d_in, rank) and
      (rank, >= max d_out) (e.g. PEFT's `vera_A.T`, `vera_B.T`).
    seed: Recorded on the nodes for exports (`projection_prng_key`).

  Returns:
    A tree of `VeraWeight` / `None` mirroring `params`.
  """
  plans = config.plan(params)
  max_in = max(p.shape[0] for p in plans.values())
  max_out = max(p.shape[1] for p in plans.values())
  dtype = jnp.dtype(config.param_dtype)
  if projections is None:
    pa, pb = vera_projections(max_in, max_out, config.rank, key=key,
                              dtype=dtype)
  else:
    pa, pb = (jnp.asarray(x) for x in projections)
    if (pa.ndim != 2 or pb.ndim != 2 or pa.shape[1] != config.rank
        or pb.shape[0] != config.rank or pa.shape[0] < max_in
        or pb.shape[1] < max_out):
      raise ValueError(
          f"VeRA projections a{tuple(pa.shape)} b{tuple(pb.shape)} do not"
          f" fit: need a (>= {max_in}, {config.rank}) and b ({config.rank},"
          f" >= {max_out}).")
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  nodes: list[Any] = []
  for kp, _ in flat:
    plan = plans.get(paths_lib.path_str(kp))
    if plan is None:
      nodes.append(None)
      continue
    d_in, d_out = plan.shape
    nodes.append(VeraWeight(
        lambda_d=jnp.full((config.rank,), config.d_initial, dtype),
        lambda_b=jnp.zeros((d_out,), dtype),
        a=pa[:d_in], b=pb[:, :d_out], seed=seed))
  return jax.tree_util.tree_unflatten(treedef, nodes)


# -- PiSSA / OLoRA -----------------------------------------------------------


def _to_matrix(w: jax.Array, axes: str):
  """`w` as (S, I, O) float32 plus the inverse map."""
  perm = ([j for j, c in enumerate(axes) if c == "s"]
          + [j for j, c in enumerate(axes) if c == "i"]
          + [j for j, c in enumerate(axes) if c == "o"])
  wt = jnp.transpose(w.astype(jnp.float32), perm)
  sizes = [math.prod(w.shape[j] for j, c in enumerate(axes) if c == k)
           for k in "sio"]
  m = jnp.reshape(wt, sizes)

  def back(x):
    x = jnp.reshape(x, wt.shape)
    return jnp.transpose(x, np.argsort(perm)).astype(w.dtype)

  return m, back


def _randomized_svd(m: jax.Array, rank: int, niter: int, key: jax.Array):
  """Top-`rank` SVD of each (I, O) matrix by the randomized range finder.

  Halko et al. 2011, the algorithm of `torch.svd_lowrank(q=rank)`: `niter`
  power iterations, re-orthonormalised by QR each time.
  """
  omega = jax.random.normal(key, (*m.shape[:-2], m.shape[-1], rank),
                            jnp.float32)
  mt = jnp.swapaxes(m, -1, -2)
  hp = jax.lax.Precision.HIGHEST
  q, _ = jnp.linalg.qr(jnp.matmul(m, omega, precision=hp))
  for _ in range(niter):
    q, _ = jnp.linalg.qr(jnp.matmul(mt, q, precision=hp))
    q, _ = jnp.linalg.qr(jnp.matmul(m, q, precision=hp))
  small = jnp.matmul(jnp.swapaxes(q, -1, -2), m, precision=hp)
  ub, s, vt = jnp.linalg.svd(small, full_matrices=False)
  return jnp.matmul(q, ub, precision=hp), s, vt


def _decompose_one(w, plan: WeightPlan, init: str, key) -> tuple[Any, Any]:
  m, back = _to_matrix(jnp.asarray(w), plan.axes)
  r, s = plan.rank, plan.scale
  hp = jax.lax.Precision.HIGHEST
  if init == "olora":
    # PEFT: QR of the (out, in) weight, B = Q[:, :r], A = R[:r].
    q, rr = jnp.linalg.qr(jnp.swapaxes(m, -1, -2))
    a = jnp.swapaxes(rr[..., :r, :], -1, -2)      # (S, I, r)
    b = jnp.swapaxes(q[..., :, :r], -1, -2)       # (S, r, O)
  else:
    if init == "pissa":
      u, sv, vt = jnp.linalg.svd(m, full_matrices=False)
      u, sv, vt = u[..., :r], sv[..., :r], vt[..., :r, :]
    else:
      niter = int(init.split("_niter_")[1])
      u, sv, vt = _randomized_svd(m, r, niter, key)
    root = jnp.sqrt(sv / s)
    a = u * root[..., None, :]
    b = root[..., :, None] * vt
  residual = m - s * jnp.matmul(a, b, precision=hp)
  return back(residual), (a.reshape(plan.a_shape), b.reshape(plan.b_shape))


def decompose(params: PyTree, config: LoraConfig, *, key: jax.Array
              ) -> tuple[PyTree, PyTree]:
  """PiSSA / OLoRA: the adapter takes the top part of each weight.

  For each targeted weight `W` (as an (in, out) matrix, stacked axes
  batched), with `s` the adapter's scale:

  - `init="pissa"`: `W = U S V^T` (SVD), `a = U_r sqrt(S_r / s)`,
    `b = sqrt(S_r / s) V_r^T`, so `s * a @ b` is the best rank-`r` part;
  - `init="pissa_niter_K"`: the same from a randomized SVD (K power
    iterations; Halko et al. 2011), much faster for large weights;
  - `init="olora"`: `W^T = Q R` (QR), `b = Q[:, :r]^T`, `a = R[:r]^T`;

  and the base becomes the residual `W - s * a @ b`, so the adapted model
  equals the original one at step 0 (to float32 rounding). With `use_dora`
  the magnitudes start at the norms of `W`. Pure: `params` is not changed.

  Args:
    params: The base params (arrays).
    config: A `LoraConfig` with `init` one of `"pissa"`, `"pissa_niter_K"`,
      `"olora"`.
    key: PRNG key (used by the randomized SVD).

  Returns:
    `(residual_params, adapter)`: new params with the same structure and
    dtypes, and the adapter (dtype `config.param_dtype`).

  Raises:
    ValueError: If `config.init` is not a decomposing init, or `config` does
      not fit `params`.

  References:
    Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors
    Adaptation of Large Language Models"; Büyükakyüz 2024, "OLoRA:
    Orthonormal Low-Rank Adaptation of Large Language Models".
  """
  if not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a LoraConfig; got {type(config)}.")
  if config.method not in ("pissa", "olora") and not (
      config.use_dora and config.init.startswith(("pissa", "olora"))):
    raise ValueError(
        f"`decompose` needs `init` 'pissa', 'pissa_niter_K' or 'olora'; got"
        f" init={config.init!r}. Use `lorajax.init` for 'lora'/'gaussian'.")
  plans = config.plan(params)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  new_params: list[Any] = []
  nodes: list[Any] = []
  dtype = jnp.dtype(config.param_dtype)
  for kp, w in flat:
    plan = plans.get(paths_lib.path_str(kp))
    if plan is None:
      new_params.append(w)
      nodes.append(None)
      continue
    res, (a, b) = _decompose_one(w, plan, config.init,
                                 _path_key(key, plan.path))
    node = LoraWeight(a=a.astype(dtype), b=b.astype(dtype), alpha=plan.alpha,
                      axes=plan.axes, rslora=config.use_rslora)
    if config.use_dora:
      node = with_magnitude(res, node, path=plan.path)
    new_params.append(res)
    nodes.append(node)
  return (jax.tree_util.tree_unflatten(treedef, new_params),
          jax.tree_util.tree_unflatten(treedef, nodes))


def to_lora(adapter: PyTree, initial: PyTree) -> PyTree:
  """A trained PiSSA/OLoRA adapter as plain LoRA on the ORIGINAL base.

  With `W = W_res + s a0 b0` (the decomposition) and the trained model
  `W_res + s a b`, the update relative to `W` is `s (a b - a0 b0) =
  s [a | a0] [b ; -b0]`: a LoRA of twice the rank with the same scale
  (PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)`).

  Args:
    adapter: The trained adapter.
    initial: The adapter `decompose` returned (before training).

  Returns:
    An adapter tree of `LoraWeight`s of rank `2r` (alpha set so the scale is
    unchanged).

  Raises:
    ValueError: If the trees differ in structure, rank, scale or axes, or a
      node is DoRA or VeRA (not expressible as plain LoRA).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(adapter,
                                                       is_leaf=is_node)
  try:
    init_flat = treedef.flatten_up_to(initial)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "`initial` must have the structure of `adapter` (the adapter"
        f" `lorajax.decompose` returned before training). ({e})") from None
  out: list[Any] = []
  errors: list[str] = []
  for (kp, n), n0 in zip(flat, init_flat):
    path = paths_lib.path_str(kp)
    if n is None:
      out.append(None)
      continue
    if not (isinstance(n, LoraWeight) and isinstance(n0, LoraWeight)) or (
        n.magnitude is not None):
      errors.append(f"{path!r}: only plain LoRA nodes convert (no DoRA or"
                    " VeRA)")
      out.append(None)
      continue
    if (n.a.shape != n0.a.shape or n.b.shape != n0.b.shape
        or n.axes != n0.axes or not math.isclose(n.scale, n0.scale)):
      errors.append(f"{path!r}: a{tuple(n.a.shape)} b{tuple(n.b.shape)}"
                    f" scale {n.scale} vs initial a{tuple(n0.a.shape)} b"
                    f"{tuple(n0.b.shape)} scale {n0.scale}")
      out.append(None)
      continue
    n_s = n.axes.count("s")
    a = jnp.concatenate([n.a, n0.a.astype(n.a.dtype)], axis=-1)
    b = jnp.concatenate([n.b, -n0.b.astype(n.b.dtype)], axis=n_s)
    # Same scale at twice the rank: alpha * 2 (alpha * sqrt(2) with rsLoRA).
    out.append(LoraWeight(a=a, b=b, alpha=n.alpha * (
        math.sqrt(2.0) if n.rslora else 2.0), axes=n.axes, rslora=n.rslora))
  if errors:
    raise ValueError("`to_lora` cannot convert:\n- " + "\n- ".join(errors))
  return jax.tree_util.tree_unflatten(treedef, out)


# -- EVA ---------------------------------------------------------------------


def _incremental_pca(state, x, k):
  """Folds rows `x` (n, d) into a running top-`k` PCA.

  The state is `(S V^T, mean, count, sum of squares)`. As in Ross et al.
  2008 (and sklearn's / PEFT's `IncrementalPCA`), the rows `S V^T` of the
  components so far are stacked with the new rows centred on their own mean
  and one row correcting for the shift of the mean, and the SVD of the stack
  gives the updated components; it is exact up to the truncation to `k`.
  """
  sv, mean, n, sumsq = state
  x = x.astype(jnp.float32)
  m = x.shape[0]
  x_mean = jnp.mean(x, axis=0)
  if sv is None:
    stacked = x - x_mean
    new_mean = x_mean
  else:
    total = n + m
    new_mean = (n * mean + m * x_mean) / total
    shift = math.sqrt(n * m / total) * (mean - x_mean)
    stacked = jnp.concatenate([sv, x - x_mean, shift[None, :]], axis=0)
  _, s, vt = jnp.linalg.svd(stacked, full_matrices=False)
  k = min(k, s.shape[0])
  return s[:k, None] * vt[:k], new_mean, n + m, sumsq + jnp.sum(x * x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Probe:
  """Adapter node that records the inputs of its weight's matmuls (EVA)."""

  sink: int = dataclasses.field(metadata=dict(static=True))


_SINKS: dict[int, dict[str, list[np.ndarray]]] = {}


class _ProbeKind(extend.AdapterKind):
  """Runs the base weight unchanged and records `x` of each `x @ W`."""

  name = "eva-probe"

  def factored(self, node, base, path):
    return extend.Factored(base, (), "io", (), self, node.sink, path)

  def materialize(self, v):
    return extend.dense(v.base)

  def dot_general(self, v, use):
    (lc, rc), (lb, rb) = jc.dot_dims(use.params)
    w_con, x_con = (lc, rc) if use.position == 0 else (rc, lc)
    x = use.operands[1 - use.position]
    if lb or rb or len(w_con) != 1 or v.roles[w_con[0]] != "i":
      return None  # not an input-side matmul: report it
    if isinstance(x, jax.core.Tracer):
      raise ValueError(
          f"EVA input capture met {v.path!r} inside a traced region (jit,"
          " scan, remat, ...), where inputs are not values. Call `fn`"
          " without jit/scan for the calibration pass, or collect the"
          " activations yourself and pass them as `activations`.")
    rows = np.asarray(jnp.moveaxis(x, x_con[0], -1), np.float32)
    _SINKS[v.meta].setdefault(v.path, []).append(
        rows.reshape(-1, rows.shape[-1]))
    return use.base_output()


extend.register_adapter_kind(_Probe, _ProbeKind())


def _captured_inputs(fn, params, plans, batches):
  """Yields `{path: inputs}` per batch by running `fn` with probe nodes."""
  from lorajax._src.core.factored import lora  # noqa: PLC0415

  sink = id(plans)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  probes = jax.tree_util.tree_unflatten(treedef, [
      _Probe(sink) if paths_lib.path_str(kp) in plans else None
      for kp, _ in flat])
  run = lora(fn, strict=True)
  try:
    for batch in batches:
      _SINKS[sink] = {}
      run(params, probes, *(batch if isinstance(batch, tuple) else (batch,)))
      got = _SINKS[sink]
      yield {p: np.concatenate(v) for p, v in got.items()}
  finally:
    _SINKS.pop(sink, None)


def eva_init(params: PyTree, config: LoraConfig,
             activations: Iterable[Any], *, fn: Any = None,
             redistribute: bool = False, rho: float = 2.0
             ) -> tuple[PyTree, LoraConfig]:
  """EVA: `a` from the top principal components of each layer's inputs.

  For each targeted 2-D weight, the inputs `X` (tokens x d_in) seen over the
  calibration batches are reduced by an incremental PCA (the right-singular
  vectors of the centred inputs, as PEFT's EVA computes them); `a` becomes
  the top `rank` components (as columns, shape (d_in, rank)), `b` is zero
  (the adapted model starts equal to the base). With `redistribute=True`
  each layer first keeps `rho * rank` components, the components of all
  layers are ranked by explained variance ratio (`sigma_k^2` over the total
  variance of that layer's inputs) and the `rank * n_layers` best are kept
  (PEFT's rule): a layer's rank is how many of its components were kept, and
  a layer with none gets no adapter (it is added to `exclude`). The ranks
  come back as the returned config's `rank_pattern`, so exports round-trip
  as PEFT's `rank_pattern`.

  Args:
    params: The base params.
    config: A `LoraConfig` with `init="eva"`.
    activations: An iterable of batches. Without `fn`, each maps a
      targeted weight's path to its input activations `(..., d_in)` (the `x`
      of `x @ W`) for that batch. With `fn`, each is the argument (or a
      tuple of arguments) of `fn(params, ...)`, and the inputs of every
      targeted weight's matmuls are recorded while `fn` runs (eagerly,
      through `lorajax.lora`; not under `jit` or inside `scan`).
    fn: Optional model function `fn(params, *args)` for the capture.
    redistribute: Redistribute ranks by explained variance.
    rho: Components kept per layer before redistribution, times `rank`.

  Returns:
    `(adapter, config)`: the adapter and the config with the final ranks in
    `rank_pattern` (full weight paths, regex-escaped).

  Raises:
    ValueError: If a targeted weight gets no activations, an activation's
      last axis is not the weight's d_in, or an unknown path is given.

  References:
    Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning
    via Explained Variance Adaptation".
  """
  import re  # noqa: PLC0415

  if not isinstance(config, LoraConfig) or config.init != "eva":
    raise ValueError("`eva_init` needs a LoraConfig with init='eva'; got"
                     f" {config!r}.")
  plans = config.plan(params)
  bad = [p for p, pl in plans.items() if pl.axes != "io"]
  if bad:
    raise ValueError(f"EVA supports 2-D (d_in, d_out) weights; not {bad}.")
  k_max = {p: (max(pl.rank, math.ceil(rho * pl.rank)) if redistribute
               else pl.rank) for p, pl in plans.items()}
  states: dict[str, Any] = {p: (None, None, 0, jnp.zeros((), jnp.float32))
                            for p in plans}
  if fn is not None:
    activations = _captured_inputs(fn, params, plans, activations)
  for batch in activations:
    for path, x_in in batch.items():
      if path not in plans:
        raise ValueError(
            f"`activations` names {path!r}, which is not a targeted weight."
            " Targeted weights:\n" + paths_lib.format_paths(list(plans)))
      x = jnp.asarray(x_in)
      d_in = plans[path].shape[0]
      if x.shape[-1] != d_in:
        raise ValueError(
            f"activations for {path!r} have shape {tuple(x.shape)}; the last"
            f" axis must be the weight's d_in = {d_in}.")
      # Keep spare components, so the truncation barely affects the top k.
      keep = min(d_in, 2 * k_max[path] + 32)
      states[path] = _incremental_pca(states[path], x.reshape(-1, d_in),
                                      keep)
  missing = [p for p, st in states.items() if st[0] is None]
  if missing:
    raise ValueError("No activations were given for:\n"
                     + paths_lib.format_paths(missing))
  comps = {}
  for p, (sv_all, mean, n, sumsq) in states.items():
    sv = sv_all[:k_max[p]]
    s = jnp.linalg.norm(sv, axis=1)
    total = sumsq - n * jnp.sum(mean * mean)  # centred sum of squares
    comps[p] = (np.asarray(s * s / total), np.asarray(sv / s[:, None]))
  ranks = {p: min(plans[p].rank, comps[p][0].shape[0]) for p in plans}
  if redistribute:
    # PEFT's rule: pool every layer's explained-variance ratios, keep the
    # `rank * n_layers` largest; a layer's rank is how many of its own were
    # kept (layers with none get no adapter).
    budget = sum(pl.rank for pl in plans.values())
    pool = sorted(((float(v), p) for p, (ev, _) in comps.items()
                   for v in ev), key=lambda t: -t[0])[:budget]
    ranks = dict.fromkeys(plans, 0)
    for _, p in pool:
      ranks[p] += 1
  limit = {p: min(plans[p].shape) for p in plans}
  ranks = {p: min(r, limit[p]) for p, r in ranks.items()}
  dropped = [re.escape(p) for p, r in ranks.items() if r == 0]
  rank_pattern = {re.escape(p): r for p, r in ranks.items()
                  if r not in (0, config.rank)}
  old = config.exclude
  exclude = ((old,) if isinstance(old, str) else tuple(old or ())) + tuple(
      dropped)
  new_config = dataclasses.replace(
      config, rank_pattern=dict(rank_pattern) or None,
      exclude=exclude or None)
  new_plans = new_config.plan(params)
  dtype = jnp.dtype(config.param_dtype)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  nodes: list[Any] = []
  for kp, _ in flat:
    path = paths_lib.path_str(kp)
    pl = new_plans.get(path)
    if pl is None:
      nodes.append(None)
      continue
    vt = comps[path][1][:pl.rank]
    node = LoraWeight(a=jnp.asarray(vt.T, dtype),
                      b=jnp.zeros((pl.rank, pl.shape[1]), dtype),
                      alpha=pl.alpha, axes="io", rslora=config.use_rslora)
    if config.use_dora:
      node = with_magnitude(flat_value(params, kp), node, path=path)
    nodes.append(node)
  return jax.tree_util.tree_unflatten(treedef, nodes), new_config


def flat_value(tree: PyTree, keypath) -> Any:
  """The leaf of `tree` at `keypath`."""
  for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if p == keypath:
      return x
  raise KeyError(keypath)
