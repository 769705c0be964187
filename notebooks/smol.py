"""Shared code of the SmolLM2-135M experiment notebooks (08 onwards).

The tiny-model notebooks (02-07, `lab.py`) stay as the fast variants; these
re-run the findings on the embedded SmolLM2-135M-Instruct (width 576, 30
layers), where rank 16 is a sliver of the width.

- `load()`: the model and its float32 params (`LORAJAX_SMOKE=1`: only the
  first 2 of the 30 layers, and XLA's backend optimisations off, so the
  smoke run compiles and steps in seconds).
- `corpus()`: the fine-tuning corpus (source of ten stdlib modules, the same
  text as the tiny notebooks) tokenised with SmolLM2's tokenizer, cached as
  `.npy` under `notebooks/.cache/` (keyed by a hash of the text).
- `run(...)`: one fine-tuning run with `lorajax.finetune.make_train_step`
  (LoRA) or `lorajax.make_train_step` with the same loss `finetune.loss_sums`
  (full fine-tuning: the trainable tree is the params themselves), Adam at a
  constant learning rate held in the optimizer state, so one compiled step
  serves every learning rate of a sweep.

Only lorajax's public API is used.
"""

import dataclasses
import hashlib
import math
import os
import pathlib
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import lab
import numpy as np
import optax

import lorajax
from lorajax import finetune
from lorajax.models import llama

SMOKE = lab.SMOKE
if SMOKE and "xla_backend_optimization_level" not in os.environ.get(
    "XLA_FLAGS", ""):
  # Smoke runs are dominated by compilation: XLA's backend optimisations
  # cost ~40% of it and buy nothing for 3 steps (read when the CPU backend
  # starts, i.e. at the first computation, after this import).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()
pick = lab.pick
CACHE = pathlib.Path(__file__).resolve().parent / ".cache"
SMOKE_LAYERS = 2

_MODEL: dict[str, Any] = {}


def load() -> tuple[llama.LlamaModel, Any]:
  """SmolLM2-135M-Instruct (float32); the first 2 layers in smoke mode."""
  if "model" not in _MODEL:
    # Per-layer params (the layout the committed runs used; the smoke mode
    # keeps the first layers by key).
    model, params = llama.from_pretrained(llama.default_model_path(),
                                          scan_layers=False)
    if SMOKE:
      config = dataclasses.replace(model.config,
                                   num_hidden_layers=SMOKE_LAYERS)
      layers = params["model"]["layers"]
      params = {**params, "model": {
          **params["model"],
          "layers": {str(i): layers[str(i)] for i in range(SMOKE_LAYERS)}}}
      tokenizer = model.tokenizer
      model = llama.LlamaModel(config)
      model.tokenizer = tokenizer
    _MODEL["model"], _MODEL["params"] = model, params
  return _MODEL["model"], _MODEL["params"]


def load_quantized() -> Any:
  """SmolLM2's params with the GGUF file's own Q4_1/Q8_0 blocks kept.

  `llama.from_pretrained(..., quantized=True)`: `lorajax.QuantizedWeight`
  leaves dequantized at each matmul; the first 2 layers in smoke mode.
  """
  if "qparams" not in _MODEL:
    _, qparams = llama.from_pretrained(llama.default_model_path(),
                                       quantized=True, scan_layers=False)
    if SMOKE:
      layers = qparams["model"]["layers"]
      qparams = {**qparams, "model": {
          **qparams["model"],
          "layers": {str(i): layers[str(i)] for i in range(SMOKE_LAYERS)}}}
    _MODEL["qparams"] = qparams
  return _MODEL["qparams"]


def corpus(model: llama.LlamaModel,
           eval_frac: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """(train, eval) SmolLM2 token ids of the stdlib-source corpus.

  The text is `lab.finetune_text()` (ten stdlib modules); the held-out set is
  its last `eval_frac` (cut on the text, so no window straddles the split).
  The tokenisation is cached in `notebooks/.cache/`.
  """
  text = lab.finetune_text()
  cut = int(len(text) * (1 - eval_frac))
  digest = hashlib.sha256(
      f"{model.tokenizer.vocab_size}|{cut}|".encode() + text.encode()
  ).hexdigest()[:16]
  path = CACHE / f"smol_stdlib_{digest}.npz"
  if path.exists():
    with np.load(path, allow_pickle=False) as z:
      return z["train"], z["eval"]
  tok = model.tokenizer
  train = np.asarray(tok.encode(text[:cut]), np.int32)
  held = np.asarray(tok.encode(text[cut:]), np.int32)
  CACHE.mkdir(exist_ok=True)
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, train=train, eval=held)
  tmp.replace(path)
  return train, held


def batches(tokens: np.ndarray, *, steps: int, batch: int, seq: int,
            seed: int) -> np.ndarray:
  """(steps, batch, seq) random windows drawn with `seed`."""
  w = lab.lm_windows(tokens, steps * batch, seq - 1, seed)
  return w.reshape(steps, batch, seq)


def _adam(lr: float) -> optax.GradientTransformation:
  del lr
  return optax.inject_hyperparams(optax.adam)(learning_rate=1.0)


_STEPS: dict[Any, Any] = {}


def subset(params: Any, pattern: str) -> dict:
  """The leaves of `params` whose path (`a/b/c`) fullmatches `pattern`.

  A nested dict with only those leaves (what "full" fine-tuning of a few
  matrices trains); `overlay` puts it back into the params.
  """
  out: dict = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if re.fullmatch(pattern, name):
      node = out
      for k in path[:-1]:
        node = node.setdefault(getattr(k, "key", k), {})
      node[getattr(path[-1], "key", path[-1])] = leaf
  if not out:
    raise ValueError(f"`train_only` {pattern!r} matches no leaf of the params.")
  return out


def overlay(params: Any, sub: Any) -> Any:
  """`params` with the leaves of `sub` (a nested dict from `subset`)."""
  if not isinstance(sub, dict):
    return sub
  return {k: overlay(v, sub[k]) if k in sub else v for k, v in params.items()}


def train_step(model: llama.LlamaModel, method: str, mode: str = "factored"):
  """The (cached) train step of `method` ("lora" or "full").

  "full" trains the tree it is given: all params (frozen=None), or a
  `subset` of them laid over the frozen params (frozen=params).
  """
  key = (id(model), method, mode)
  if key in _STEPS:
    return _STEPS[key]
  tx = _adam(1.0)
  if method == "lora":
    ts = finetune.make_train_step(model, tx, mode=mode)
  elif method == "full":
    def loss_fn(frozen, params, batch):
      ids, att, lm = batch
      if frozen is not None:
        params = overlay(frozen, params)
      return finetune.loss_sums(model.apply(params, ids, att), ids, lm)

    core = lorajax.make_train_step(loss_fn, tx, weighted=True,
                                   microbatched=True)

    def step(params, trainable, opt_state, batch):
      t, s, m = core.step(params, trainable, opt_state, batch)
      return t, s, {"loss": m["loss"], "tokens": m["weight"],
                    "grad_norm": m["grad_norm"]}

    ts = lorajax.TrainStep(init=core.init, step=step)
  else:
    raise ValueError(f"`method` must be 'lora' or 'full'; got {method!r}.")
  _STEPS[key] = (tx, ts)
  return tx, ts


_EVALS: dict[Any, Any] = {}


def logits_fn(model: llama.LlamaModel, method: str):
  """`f(params, trainable, tokens) -> logits` of the fine-tuned model.

  "lora": the factored adapter; "full": `trainable` alone when it is the
  whole params tree, else laid over `params` (`overlay`).
  """
  lora_apply = lorajax.lora(model.apply)

  def f(params, trainable, tokens):
    att = jnp.ones_like(tokens)
    if method == "lora":
      return lora_apply(params, trainable, tokens, att)
    return model.apply(overlay(params, trainable), tokens, att)
  return f


def eval_loss(model: llama.LlamaModel, method: str, params: Any,
              trainable: Any, tokens: jax.Array) -> float:
  """Mean next-token loss (nats/token) of the fine-tuned model on `tokens`."""
  key = (id(model), method)
  if key not in _EVALS:
    logits = logits_fn(model, method)

    def f(params, trainable, tokens):
      s, n = finetune.loss_sums(logits(params, trainable, tokens), tokens,
                                jnp.ones_like(tokens))
      return s / n
    _EVALS[key] = jax.jit(f)
  return float(_EVALS[key](params, trainable, tokens))


def init_training(tx: optax.GradientTransformation, params: Any,
                  method: str, *, lr: float, lora_config=None, seed: int = 0,
                  train_only: str | None = None):
  """`(trainable, frozen, optimizer state)` for a run of `method`.

  `"lora"`: a fresh adapter (`lora_config`, key `seed`) on frozen `params`;
  full fine-tuning: a copy of `params` (or of the `train_only` subset, the
  rest frozen). The state's learning rate is set to `lr`.
  """
  if method == "lora":
    if lora_config is None:
      raise ValueError("method='lora' needs a `lora_config`.")
    trainable = lorajax.init(params, lora_config, key=jax.random.key(seed))
    frozen = params
  elif train_only is not None:
    trainable = jax.tree.map(jnp.copy, subset(params, train_only))
    frozen = params
  else:
    trainable = jax.tree.map(jnp.copy, params)
    frozen = None
  state = tx.init(trainable)
  state = state._replace(hyperparams={
      **state.hyperparams, "learning_rate": jnp.float32(lr)})
  return trainable, frozen, state


def run(model: llama.LlamaModel, params: Any, data: np.ndarray,
        eval_tokens: np.ndarray | None, *, method: str, lr: float, seed: int,
        lora_config: lorajax.LoraConfig | None = None, eval_every: int = 0,
        mode: str = "factored", log: bool = True,
        loss_masks: np.ndarray | None = None, train_only: str | None = None,
        eval_fn: Any = None) -> dict:
  """One fine-tuning run at constant LR; returns its loss curves.

  Args:
    model, params: The base model and its frozen params.
    data: (steps, batch, seq) training token windows.
    eval_tokens: (n, seq) held-out windows (held-out loss at each evaluation).
    method: "lora" (adapter of `lora_config`, initialised with `seed`) or
      "full" (all params trained, or the `train_only` ones).
    lr: Adam learning rate (betas 0.9, 0.999; no clipping, no decay).
    seed: Adapter initialisation seed (the data order is in `data`).
    lora_config: The adapter config for method="lora".
    eval_every: Evaluate every this many steps (and at 0 and the end).
    mode: LoRA execution mode ("factored" or "merged").
    log: Print a line per evaluation.
    loss_masks: Optional (steps, batch, seq) 0/1 mask of the tokens whose
      prediction counts (default: all).
    train_only: method="full": a regex (`subset`) of the params to train;
      the rest stays frozen.
    eval_fn: Optional `eval_fn(method, trainable) -> float`, recorded as
      `eval_extra` at each evaluation.

  Returns:
    {"loss": per-step training loss, "eval_steps", "eval_loss" (held-out,
     if `eval_tokens`), "eval_extra" (if `eval_fn`), "seconds", "step_s"
     (median step wall time)}.
  """
  tx, ts = train_step(model, method, mode)
  trainable, frozen, state = init_training(
      tx, params, method, lr=lr, lora_config=lora_config, seed=seed,
      train_only=train_only)
  steps = data.shape[0]
  every = eval_every or steps
  ev_tokens = None if eval_tokens is None else jnp.asarray(eval_tokens)
  evals: list[float] = []
  extra: list[float] = []

  def evaluate():
    if ev_tokens is not None:
      evals.append(eval_loss(model, method, params, trainable, ev_tokens))
    if eval_fn is not None:
      extra.append(float(eval_fn(method, trainable)))

  evaluate()
  ev_steps = [0]
  losses, times = [], []
  t_start = time.perf_counter()
  for i in range(steps):
    ids = jnp.asarray(data[i][None])
    ones = jnp.ones_like(ids)
    lm = ones if loss_masks is None else jnp.asarray(loss_masks[i][None])
    t0 = time.perf_counter()
    trainable, state, m = ts.step(frozen, trainable, state, (ids, ones, lm))
    losses.append(float(m["loss"]))
    times.append(time.perf_counter() - t0)
    if (i + 1) % every == 0 or i + 1 == steps:
      evaluate()
      ev_steps.append(i + 1)
      if log:
        print(f"  {method} lr={lr:.2g} seed={seed} step {i + 1}: train"
              f" {losses[-1]:.4f}"
              + (f" held-out {evals[-1]:.4f}" if evals else "")
              + (f" eval {extra[-1]:.1f}" if extra else "")
              + f" ({times[-1]:.1f} s/step)", flush=True)
  out = {"loss": losses, "eval_steps": ev_steps,
         "seconds": time.perf_counter() - t_start,
         "step_s": float(np.median(times[1:] if len(times) > 1 else times))}
  if evals:
    out["eval_loss"] = evals
  if extra:
    out["eval_extra"] = extra
  return out


# ----------------------------------------------------------------------------
# Memorisation of random facts (notebook 11).

FACT_TOKEN_MIN = 1000  # keys and values are drawn from ids >= this


def facts_task(*, n_facts: int, n_values: int, vocab: int, per_seq: int,
               seed: int) -> dict:
  """`n_facts` random one-token key -> one-token value facts.

  Keys are distinct token ids; each key's value is drawn uniformly from a
  fixed set of `n_values` other token ids, so the table holds exactly
  `n_facts * log2(n_values)` bits. A training sequence packs `per_seq` facts
  as `k v k v ...` (the loss counts the value tokens only).

  Returns:
    {"keys", "answers" (index into "values"), "values", "bits", "per_seq"}.
  """
  if n_facts % per_seq:
    raise ValueError(f"`n_facts` ({n_facts}) must be a multiple of"
                     f" `per_seq` ({per_seq}).")
  rng = np.random.default_rng(seed)
  pool = rng.permutation(np.arange(FACT_TOKEN_MIN, vocab))
  values = pool[:n_values]
  keys = pool[n_values:n_values + n_facts]
  answers = rng.integers(0, n_values, size=n_facts)
  return {"keys": keys.astype(np.int32), "values": values.astype(np.int32),
          "answers": answers.astype(np.int32),
          "bits": n_facts * math.log2(n_values), "per_seq": per_seq}


def facts_batches(task: dict, *, steps: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, loss masks), each (steps, n_facts / per_seq, 2 per_seq).

  Every step holds every fact once, in a fresh random order.
  """
  rng = np.random.default_rng(seed)
  n, per = len(task["keys"]), task["per_seq"]
  toks = []
  for _ in range(steps):
    order = rng.permutation(n)
    seq = np.stack([task["keys"][order],
                    task["values"][task["answers"][order]]], axis=-1)
    toks.append(seq.reshape(n // per, 2 * per))
  tokens = np.stack(toks).astype(np.int32)
  mask = np.zeros_like(tokens)
  mask[..., 1::2] = 1
  return tokens, mask


def facts_bits(model: llama.LlamaModel, params: Any, task: dict):
  """`f(method, trainable) -> memorised bits` on the fact table.

  Memorised bits = `bits` minus the summed cross-entropy (bits) of each
  fact's value given its key, the prediction restricted to (renormalised
  over) the `n_values` candidate values: 0 for a model that spreads its
  probability uniformly over them, `bits` for one that is always sure and
  right.
  """
  n, per = len(task["keys"]), task["per_seq"]
  seq = np.stack([task["keys"], task["values"][task["answers"]]], -1)
  tokens = jnp.asarray(seq.reshape(n // per, 2 * per))
  values = jnp.asarray(task["values"])
  answers = jnp.asarray(task["answers"].reshape(n // per, per))
  fns: dict = {}

  def f(method, trainable):
    if method not in fns:
      logits = logits_fn(model, method)

      def g(params, trainable):
        lg = logits(params, trainable, tokens)[:, 0::2].astype(jnp.float32)
        lp = jax.nn.log_softmax(lg[..., values], axis=-1)
        nll = -jnp.take_along_axis(lp, answers[..., None], -1).sum()
        return task["bits"] - nll / np.log(2.0)
      fns[method] = jax.jit(g)
    return fns[method](params, trainable)
  return f


def flops_per_token(config: llama.LlamaConfig, *, rank: int | None,
                    targets: Sequence[str] | None = None) -> dict:
  """Multiply-adds per token of one train step (matmuls only).

  Full fine-tuning: 3 per weight (forward, input gradient, weight gradient)
  for every linear layer and the tied head; the embedding lookup is free.
  LoRA (rank r on the `targets` linear layers): 2 per frozen weight (no dense
  weight gradient; the head still needs its forward and input gradient) plus
  3 r (d_in + d_out) per adapted matrix (forward, input and weight gradients
  of the two thin factors). Attention scores are left out (seq <= 128 makes
  them < 3% of the total here).
  """
  h, f = config.hidden_size, config.intermediate_size
  hd = config.head_dim
  nq, nkv = config.num_attention_heads * hd, config.num_key_value_heads * hd
  shapes = {"q_proj": (h, nq), "k_proj": (h, nkv), "v_proj": (h, nkv),
            "o_proj": (nq, h), "gate_proj": (h, f), "up_proj": (h, f),
            "down_proj": (f, h)}
  targets = tuple(targets or shapes)
  layers = config.num_hidden_layers
  linear = layers * sum(a * b for a, b in shapes.values())
  head = config.vocab_size * h
  full = 3 * (linear + head)
  out = {"full": full}
  if rank is not None:
    adapter = layers * sum(3 * rank * (shapes[t][0] + shapes[t][1])
                           for t in targets)
    out["lora"] = 2 * (linear + head) + adapter
    out["ratio"] = out["lora"] / full
  return out


def environment() -> dict:
  """What the numbers were measured on (incl. the load average)."""
  env = lab.environment()
  env["loadavg"] = list(os.getloadavg())
  return env


def sweep(name: str, key: str, fn: Any) -> dict:
  """Runs `fn()` unless results/<name>_runs.json already holds `key`.

  Every finished run is written at once (atomically), so a full-size sweep
  interrupted by the machine's time limit resumes where it stopped. Smoke
  mode keeps the runs in memory only.
  """
  store = _STORES.setdefault(name, (lab.load_json(f"{name}_runs") or {})
                             if not SMOKE else {})
  if key not in store:
    store[key] = fn()
    lab.save_json(f"{name}_runs", store)
  return store[key]


_STORES: dict[str, dict] = {}
