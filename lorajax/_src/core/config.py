"""`LoraConfig`: which weights get adapters, with what rank, scale and axes."""

import dataclasses
import inspect
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from lorajax._src.core import paths as paths_lib
from lorajax._src.core import quant as quant_lib
from lorajax._src.core import targets as targets_lib

PRESETS = ("all-linear", "attention", "mlp")
INITS = ("lora", "gaussian", "pissa", "olora", "eva")


def _is_scan_stacked(path: str, ndim: int) -> bool:
  """The default-`"sio"` rule for scan-stacked layers (see `LoraConfig`).

  True for a 3-axis weight whose path runs through a part named `layers`
  followed by at least one module name and the weight name, none of them an
  index: `model/layers/self_attn/q_proj/kernel` (`lorajax.models.llama` with
  scanned layers, Flax `nn.scan(..., variable_axes={"params": 0})` modules
  named `layers`), but not `model/layers/0/.../kernel` or `layers/kernel`.
  """
  parts = path.split("/")
  if ndim != 3 or parts[-1] not in ("kernel", "weight", "w"):
    return False
  for j, part in enumerate(parts[:-2]):
    if part == "layers":
      return not any(q.isdigit() for q in parts[j + 1:])
  return False


def _is_weight_node(x: Any) -> bool:
  return quant_lib.is_quantized(x) or quant_lib.is_merged(x)


def _as_tuple(value: Any, name: str) -> tuple[str, ...]:
  if isinstance(value, str):
    return (value,)
  if isinstance(value, Sequence):
    out = tuple(value)
    for v in out:
      if not isinstance(v, str):
        raise TypeError(f"`{name}` must hold regex strings; got {v!r}.")
    return out
  raise TypeError(
      f"`{name}` must be a regex string or a list of them; got {value!r}."
  )


def _as_pairs(value: Any, name: str, kind: type) -> tuple[tuple[str, Any], ...]:
  if value is None:
    return ()
  if isinstance(value, Mapping):
    items = tuple(value.items())
  elif isinstance(value, Sequence) and not isinstance(value, str):
    items = tuple(tuple(kv) for kv in value)
  else:
    raise TypeError(
        f"`{name}` must map regex strings to {kind.__name__} values; got"
        f" {value!r}."
    )
  for k, v in items:
    if not isinstance(k, str):
      raise TypeError(f"`{name}` keys must be regex strings; got {k!r}.")
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
      continue
    if not isinstance(v, kind) or isinstance(v, bool):
      raise TypeError(
          f"`{name}[{k!r}]` must be a {kind.__name__}; got {v!r}."
      )
  return items


def _compile(pattern: str, name: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(
        f"`{name}` holds an invalid regex {pattern!r}: {e}. Write a Python"
        " regular expression matched with `re.fullmatch` against paths like"
        " 'params/Dense_0/kernel'."
    ) from None


def _pattern_matches(pattern: str, path: str) -> bool:
  """PEFT's pattern rule: the key matches the path or a `/`-suffix of it.

  The key is tried against the leaf path (`layers/0/q_proj/kernel`) and the
  module path (`layers/0/q_proj`), so `{"q_proj": 4}` works as in PEFT.
  """
  module = path.rsplit("/", 1)[0] if "/" in path else path
  rx = rf"(?:.*/)?(?:{pattern})"
  return bool(re.fullmatch(rx, path) or re.fullmatch(rx, module))


@dataclasses.dataclass(frozen=True)
class WeightPlan:
  """How one targeted weight is adapted (computed by `LoraConfig.plan`).

  Attributes:
    path: The weight's path string.
    shape: The weight's shape.
    dtype: The weight's dtype.
    axes: One letter per weight axis: `s` stacked, `i` input, `o` output.
    rank: The adapter rank.
    alpha: The adapter alpha.
    scale: `alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA.
  """

  path: str
  shape: tuple[int, ...]
  dtype: Any
  axes: str
  rank: int
  alpha: float
  scale: float

  @property
  def stack_shape(self) -> tuple[int, ...]:
    return tuple(d for d, c in zip(self.shape, self.axes) if c == "s")

  @property
  def in_shape(self) -> tuple[int, ...]:
    return tuple(d for d, c in zip(self.shape, self.axes) if c == "i")

  @property
  def out_shape(self) -> tuple[int, ...]:
    return tuple(d for d, c in zip(self.shape, self.axes) if c == "o")

  @property
  def a_shape(self) -> tuple[int, ...]:
    return (*self.stack_shape, *self.in_shape, self.rank)

  @property
  def b_shape(self) -> tuple[int, ...]:
    return (*self.stack_shape, self.rank, *self.out_shape)


def check_axes(axes: str, shape: tuple[int, ...], path: str) -> None:
  """Raises a ValueError unless `axes` is a valid axes string for `shape`."""
  if not isinstance(axes, str) or set(axes) - set("sio"):
    raise ValueError(
        f"Axes string {axes!r} for {path!r} may only contain the letters 's'"
        " (stacked), 'i' (input) and 'o' (output), one per weight axis; e.g."
        " 'sio' for a (layers, d_in, d_out) kernel."
    )
  if len(axes) != len(shape):
    raise ValueError(
        f"Axes string {axes!r} for {path!r} has {len(axes)} letters but the"
        f" weight has shape {shape} ({len(shape)} axes). Write one letter per"
        " axis: 's' stacked, 'i' input, 'o' output."
    )
  if "i" not in axes or "o" not in axes:
    raise ValueError(
        f"Axes string {axes!r} for {path!r} needs at least one 'i' (input) and"
        " one 'o' (output) axis."
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """Which weights get LoRA adapters, and how.

  Every adapted weight `W` becomes `W + scale * a @ b` with `a` of shape
  `(*stack, *in, rank)` and `b` of shape `(*stack, rank, *out)`, and
  `scale = alpha / rank` (or `alpha / sqrt(rank)` with rsLoRA).

  Weights are named by path strings: the pytree keys joined by `/`, with Flax
  NNX's trailing `value` dropped (`params/block_0/up/kernel` in linen params,
  `block_0/up/kernel` in an `nnx.split` state or a plain dict).

  Presets read a path as module path + weight name by a table of naming
  families (docs/core.md): `kernel` (flax, keras, `lorajax.models.llama`),
  `weight` (PyTorch/PEFT state dicts, equinox), `w` (haiku, gemma einsums),
  penzai's `<module>.weights[/data_array]`, gemma's bare `mlp/gating_einsum`
  and `mlp/linear`, and fused expert banks (`experts/gate_up_proj`,
  keras-hub's `experts/expert_feedforward_*_dense`). `"all-linear"` adapts
  every floating-point weight with at least two axes that the table reads,
  except embedding tables (a path part containing `embed`, `embedding`,
  `wte`, `wpe` or `token_embd`, or named `emb` or `*_emb`) and output
  heads (a module or a part above it named `lm_head`, `head`, `output` or
  `classifier`; an `output` directly under an attention part is the
  attention's output projection and is kept). `"attention"` adapts the
  usual attention projections (`q`/`k`/`v`/`o`, `q_proj`..,
  `query`/`key`/`value`/`out`, `qkv`, `c_attn`, `wq`.., gemma's
  `q_einsum`..) and `"mlp"` the usual MLP projections (`up`/`down`/
  `gate`, `*_proj`, `wi`/`wo`, `fc1`/`fc2`, `w1`/`w2`/`w3`, gemma's
  `gating_einsum`/`linear`, penzai's `*_linear`, keras-hub's
  `feedforward_*_dense`..). `lorajax.summary(..., config=config)` shows
  which rule selected each weight and why the others were left out;
  `lorajax.select_linear(fn, params, *args)` selects by use instead of by
  name.

  Attributes:
    rank: Default adapter rank, at least 1.
    alpha: Default LoRA alpha, greater than 0.
    targets: A regex matched with `re.fullmatch` against each leaf's path, a
      list of such regexes, or a preset name (`"all-linear"`, `"attention"`,
      `"mlp"`).
    exclude: Regex or list of regexes (fullmatch) removed from the targets.
    rank_pattern: Maps regexes to per-weight ranks. As in PEFT, a key matches a
      weight when it matches its path or module path, or a `/`-separated
      suffix of either (`{"q_proj": 4}`); the first matching key wins.
    alpha_pattern: Like `rank_pattern`, for alpha.
    use_rslora: Scale by `alpha / sqrt(rank)` (rsLoRA) instead of `alpha /
      rank`.
    axes: Maps regexes (fullmatch) to an axes string with one letter per
      weight axis: `s` stacked (scan-stacked layers, MoE experts: a separate
      adapter per slice), `i` input (contracted with the activation), `o`
      output. A 2-D weight defaults to `"io"`. A 3-D weight under a path
      part named `layers` followed by module names (no layer index), the
      scan-stacked layout of `lorajax.models.llama`
      (`model/layers/self_attn/q_proj/kernel`, shape `(layers, in, out)`),
      defaults to `"sio"`: one adapter per layer. Any other weight with more
      than two axes needs an entry.
    init: `"lora"` (`a` uniform in +-1/sqrt(d_in), `b` zero; Hu et al. 2021),
      or `"gaussian"` (`a` normal with std 1/rank, `b` zero, as PEFT's
      `init_lora_weights="gaussian"`); both are made by `lorajax.init`.
      `"pissa"` (top-`rank` SVD of each weight; Meng et al. 2024),
      `"pissa_niter_K"` (the same by randomized SVD with K power
      iterations) and `"olora"` (QR of each weight; Büyükakyüz 2024) move
      the top part of the weight into the adapter and need
      `lorajax.decompose`, which also returns the residual base; `"eva"`
      (from calibration activations; Paischer et al. 2024) needs
      `lorajax.eva_init`.
    use_dora: DoRA (Liu et al. 2024): each adapter also trains a per-output
      magnitude, `W' = m * (W + delta) / ||W + delta||` (PEFT's `use_dora`).
    param_dtype: Storage dtype of `a` and `b` (Flax's naming: `dtype` is a
      computation dtype, `param_dtype` a storage dtype; the factored
      transform computes in the base weight's dtype). `dtype=` is a
      deprecated alias of `param_dtype` (removed in lorajax 0.2.0).

  All fields are keyword-only: `LoraConfig(rank=16, alpha=32.0)`.
  """

  rank: int = 8
  alpha: float = 32.0
  targets: str | tuple[str, ...] = "all-linear"
  exclude: str | tuple[str, ...] | None = None
  rank_pattern: Any = None
  alpha_pattern: Any = None
  use_rslora: bool = False
  axes: Any = None
  init: str = "lora"
  param_dtype: Any = "float32"
  use_dora: bool = False

  def __post_init__(self):
    set_ = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731
    if isinstance(self.rank, bool) or not isinstance(self.rank, int):
      raise TypeError(f"`rank` must be an int; got {self.rank!r}.")
    if self.rank < 1:
      raise ValueError(f"`rank` must be >= 1; got rank={self.rank}.")
    if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
      raise TypeError(f"`alpha` must be a number; got {self.alpha!r}.")
    if not (math.isfinite(self.alpha) and self.alpha > 0):
      raise ValueError(
          f"`alpha` must be > 0 and finite; got alpha={self.alpha}.")
    set_("alpha", float(self.alpha))
    targets = _as_tuple(self.targets, "targets")
    if not targets:
      raise ValueError("`targets` is empty; name at least one regex or preset.")
    set_("targets", targets[0] if len(targets) == 1 else targets)
    if self.exclude is not None:
      ex = _as_tuple(self.exclude, "exclude")
      set_("exclude", ex[0] if len(ex) == 1 else ex)
    set_("rank_pattern", _as_pairs(self.rank_pattern, "rank_pattern", int))
    set_("alpha_pattern", _as_pairs(self.alpha_pattern, "alpha_pattern", float))
    set_("alpha_pattern", tuple((k, float(v)) for k, v in self.alpha_pattern))
    set_("axes", _as_pairs(self.axes, "axes", str))
    for k, r in self.rank_pattern:
      if r < 1:
        raise ValueError(f"`rank_pattern[{k!r}]` must be >= 1; got {r}.")
    for k, a in self.alpha_pattern:
      if not (math.isfinite(a) and a > 0):
        raise ValueError(
            f"`alpha_pattern[{k!r}]` must be > 0 and finite; got {a}.")
    for k, ax in self.axes:
      if not ax or set(ax) - set("sio"):
        raise ValueError(
            f"`axes[{k!r}]` = {ax!r}: an axes string may only contain the"
            " letters 's' (stacked), 'i' (input) and 'o' (output)."
        )
    for name in ("targets", "exclude"):
      for t in self._tuple(name):
        if t not in PRESETS:
          _compile(t, name)
    for name in ("rank_pattern", "alpha_pattern", "axes"):
      for k, _ in getattr(self, name):
        _compile(k, name)
    if not isinstance(self.init, str) or not (
        self.init in INITS or re.fullmatch(r"pissa_niter_[1-9][0-9]*",
                                           self.init)):
      raise ValueError(
          "`init` must be 'lora' or 'gaussian' (made by `lorajax.init`),"
          " 'pissa', 'pissa_niter_K' (K >= 1 power iterations) or 'olora'"
          " (made by `lorajax.decompose`), or 'eva' (`lorajax.eva_init`);"
          f" got {self.init!r}."
      )
    if not isinstance(self.use_dora, bool):
      raise TypeError(f"`use_dora` must be a bool; got {self.use_dora!r}.")
    try:
      dtype = jnp.dtype(self.param_dtype)
    except TypeError:
      raise TypeError(
          f"`param_dtype` is not a dtype: {self.param_dtype!r}.") from None
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"`param_dtype` must be a floating dtype; got {dtype}.")
    set_("param_dtype", dtype.name)

  def _tuple(self, name: str) -> tuple[str, ...]:
    v = getattr(self, name)
    if v is None:
      return ()
    return (v,) if isinstance(v, str) else tuple(v)

  def to_dict(self) -> dict[str, Any]:
    """Returns a JSON-serialisable dict; `LoraConfig(**d)` rebuilds it."""
    return {
        "rank": self.rank,
        "alpha": self.alpha,
        "targets": list(self._tuple("targets")),
        "exclude": list(self._tuple("exclude")) or None,
        "rank_pattern": dict(self.rank_pattern),
        "alpha_pattern": dict(self.alpha_pattern),
        "use_rslora": self.use_rslora,
        "axes": dict(self.axes),
        "init": self.init,
        "param_dtype": self.param_dtype,
        "use_dora": self.use_dora,
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LoraConfig":
    """Inverse of `to_dict` (also reads dicts written before 0.2, whose
    storage dtype key is `dtype`)."""
    d = dict(d)
    if "dtype" in d and "param_dtype" not in d:
      d["param_dtype"] = d.pop("dtype")
    return cls(**d)

  @property
  def dtype(self) -> str:
    """Deprecated alias of `param_dtype` (removed in lorajax 0.2.0)."""
    warnings.warn(_DTYPE_DEPRECATION, DeprecationWarning, stacklevel=2)
    return self.param_dtype

  @property
  def method(self) -> str:
    """`"dora"`, `"pissa"`, `"olora"`, `"eva"` or `"lora"`."""
    if self.use_dora:
      return "dora"
    return self.init.split("_niter_")[0] if self.init not in (
        "lora", "gaussian") else "lora"

  def scale_for(self, rank: int, alpha: float) -> float:
    """The LoRA scale for a weight with this rank and alpha."""
    return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

  def _is_target(self, path: str, ndim: int, dtype: Any) -> bool:
    return self._explain(path, ndim, dtype)[0]

  def _explain(self, path: str, ndim: int, dtype: Any) -> tuple[bool, str]:
    """Whether the weight is targeted, and which rule decided.

    Returns `(selected, why)`: the first target that matched (a preset with
    the naming family it recognised, or the regex) and, for a weight left
    out, the `exclude` entry that removed it or why the presets skipped it.
    """
    why_not = "matches no target"
    for t in self._tuple("targets"):
      if t in PRESETS:
        hit, why = targets_lib.match(t, path, ndim, dtype)
        if not hit:
          why_not = why
          continue
      elif re.fullmatch(t, path) is None:
        continue
      else:
        why = ("listed path" if t == re.escape(path) else f"regex {t!r}")
      break
    else:
      return False, why_not
    for e in self._tuple("exclude"):
      if (targets_lib.match(e, path, ndim, dtype)[0] if e in PRESETS
          else re.fullmatch(e, path)):
        return False, f"excluded by {e!r}"
    return True, why

  def _lookup(self, pairs, path):
    for k, v in pairs:
      if _pattern_matches(k, path):
        return k, v
    return None, None

  def plan(self, params: Any) -> dict[str, WeightPlan]:
    """Resolves this config against `params`: which weights, rank, axes.

    Args:
      params: The base parameter pytree (arrays or `jax.ShapeDtypeStruct`).

    Returns:
      A dict from path string to `WeightPlan`, in flattening order.

    Raises:
      ValueError: If the targets match nothing, a pattern matches no target,
        a targeted weight is not floating point or has more than two axes
        and no `axes` entry, an axes string does not fit, or a rank exceeds
        `min(d_in, d_out)`.
    """
    # A quantized weight (`lorajax.quantize`) is one leaf of its dense shape.
    leaves = paths_lib.leaves_with_paths(params, is_leaf=_is_weight_node)
    plans: dict[str, WeightPlan] = {}
    candidates = []
    errors = []
    for path, leaf in leaves:
      shape = tuple(getattr(leaf, "shape", ()))
      dtype = getattr(leaf, "dtype", None)
      if dtype is None:
        dtype = np.asarray(leaf).dtype
      if len(shape) >= 2:
        candidates.append(f"{path} {shape} {jnp.dtype(dtype).name}")
      if not self._is_target(path, len(shape), dtype):
        continue
      if not jnp.issubdtype(dtype, jnp.floating):
        errors.append(
            f"{path!r} matches the targets but has dtype {dtype}; LoRA needs"
            " a floating-point weight. Narrow `targets` or add it to"
            " `exclude`."
        )
        continue
      if len(shape) < 2:
        errors.append(
            f"{path!r} matches the targets but has shape {shape}; LoRA needs"
            " a weight with at least an input and an output axis. Narrow"
            " `targets` or add it to `exclude`."
        )
        continue
      _, axes = next(
          ((k, v) for k, v in self.axes if re.fullmatch(k, path)),
          (None, None),
      )
      if axes is None and _is_scan_stacked(path, len(shape)):
        axes = "sio"
      if axes is None:
        if len(shape) != 2:
          errors.append(
              f"{path!r} has shape {shape}: a weight with more than two axes"
              " needs an `axes` entry saying which axes are stacked (s),"
              " input (i) and output (o), e.g. `axes={"
              f"{re.escape(path)!r}: {'s' * (len(shape) - 2) + 'io'!r}}}`"
              " for a stack of (d_in, d_out) kernels, or"
              f" {'i' + 'o' * (len(shape) - 1)!r} for a (d_in, heads,"
              " head_dim) kernel. `lorajax.sharding.infer_axes(fn, params,"
              " *args, config=config)` can work it out from your model's"
              " matmuls."
          )
          continue
        axes = "io"
      try:
        check_axes(axes, shape, path)
      except ValueError as e:
        errors.append(str(e))
        continue
      _, rank = self._lookup(self.rank_pattern, path)
      rank = self.rank if rank is None else rank
      _, alpha = self._lookup(self.alpha_pattern, path)
      alpha = self.alpha if alpha is None else alpha
      plan = WeightPlan(
          path=path, shape=shape, dtype=jnp.dtype(dtype), axes=axes,
          rank=rank, alpha=alpha, scale=self.scale_for(rank, alpha),
      )
      d_in = math.prod(plan.in_shape)
      d_out = math.prod(plan.out_shape)
      if rank > min(d_in, d_out):
        errors.append(
            f"rank {rank} for {path!r} (shape {shape}, axes {axes!r}: d_in="
            f"{d_in}, d_out={d_out}) exceeds min(d_in, d_out)="
            f"{min(d_in, d_out)}. Lower `rank` or set a smaller one for this"
            " weight with `rank_pattern`."
        )
        continue
      plans[path] = plan
    if errors:
      raise ValueError(
          "LoraConfig does not fit these params:\n- " + "\n- ".join(errors)
      )
    if not plans:
      raise ValueError(
          f"`targets` {self.targets!r} (exclude={self.exclude!r}) match no"
          " weight in these params. Paths of weights with >= 2 axes:\n"
          + paths_lib.format_paths(candidates)
          + "\nWrite a regex that fullmatches one of these paths, or use a"
          " preset: 'all-linear', 'attention', 'mlp'."
      )
    for name in ("rank_pattern", "alpha_pattern"):
      for k, _ in getattr(self, name):
        if not any(_pattern_matches(k, p) for p in plans):
          raise ValueError(
              f"`{name}` key {k!r} matches none of the adapted weights:\n"
              + paths_lib.format_paths(list(plans))
          )
    for k, _ in self.axes:
      if not any(re.fullmatch(k, p) for p, _ in leaves):
        raise ValueError(
            f"`axes` key {k!r} fullmatches no weight path. Paths of weights"
            " with >= 2 axes:\n" + paths_lib.format_paths(candidates)
        )
    return plans


_DTYPE_DEPRECATION = (
    "`LoraConfig.dtype` is deprecated and will be removed in lorajax 0.2.0;"
    " use `param_dtype` (the storage dtype of `a` and `b`, Flax's naming)."
)
_dataclass_init = LoraConfig.__init__


def _init_with_dtype_alias(self, *, dtype: Any = None, **kwargs: Any):
  if dtype is not None:
    warnings.warn(_DTYPE_DEPRECATION.replace(".dtype`", "(dtype=...)`"),
                  DeprecationWarning, stacklevel=2)
    kwargs["param_dtype"] = dtype
  _dataclass_init(self, **kwargs)


setattr(_init_with_dtype_alias, "__signature__",  # noqa: B010
        inspect.signature(_dataclass_init))
_init_with_dtype_alias.__doc__ = _dataclass_init.__doc__
LoraConfig.__init__ = _init_with_dtype_alias  # type: ignore[method-assign]
