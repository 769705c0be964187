"""Shared code of the SmolLM2-135M experiment notebooks (08 onwards).

The tiny-model notebooks (02-07, `lab.py`) stay as the fast variants; these
re-run the findings on the embedded SmolLM2-135M-Instruct (width 576, 30
layers), where rank 16 is a sliver of the width.

- `load()`: the model and its float32 params (`LORAJAX_SMOKE=1`: only the
  first 2 of the 30 layers, so the smoke run compiles and steps in seconds).
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
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax
from lorajax import finetune
from lorajax.models import llama

import lab

SMOKE = lab.SMOKE
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


def train_step(model: llama.LlamaModel, method: str, mode: str = "factored"):
  """The (cached) train step of `method` ("lora" or "full")."""
  key = (id(model), method, mode)
  if key in _STEPS:
    return _STEPS[key]
  tx = _adam(1.0)
  if method == "lora":
    ts = finetune.make_train_step(model, tx, mode=mode)
  elif method == "full":
    def loss_fn(frozen, params, batch):
      del frozen
      ids, att, lm = batch
      return finetune.loss_sums(model.apply(params, ids, att), ids, lm)

    core = lorajax.make_train_step(loss_fn, tx, weighted=True,
                                   microbatched=True)

    def step(params, trainable, opt_state, batch):
      del params
      t, s, m = core.step(None, trainable, opt_state, batch)
      return t, s, {"loss": m["loss"], "tokens": m["weight"],
                    "grad_norm": m["grad_norm"]}

    ts = lorajax.TrainStep(init=core.init, step=step)
  else:
    raise ValueError(f"`method` must be 'lora' or 'full'; got {method!r}.")
  _STEPS[key] = (tx, ts)
  return tx, ts


_EVALS: dict[Any, Any] = {}


def eval_loss(model: llama.LlamaModel, method: str, params: Any,
              trainable: Any, tokens: jax.Array) -> float:
  """Mean next-token loss (nats/token) of the fine-tuned model on `tokens`."""
  key = (id(model), method)
  if key not in _EVALS:
    lora_apply = lorajax.lora(model.apply)

    def f(params, trainable, tokens):
      att = jnp.ones_like(tokens)
      if method == "lora":
        logits = lora_apply(params, trainable, tokens, att)
      else:
        logits = model.apply(trainable, tokens, att)
      s, n = finetune.loss_sums(logits, tokens, att)
      return s / n
    _EVALS[key] = jax.jit(f)
  return float(_EVALS[key](params, trainable, tokens))


def run(model: llama.LlamaModel, params: Any, data: np.ndarray,
        eval_tokens: np.ndarray, *, method: str, lr: float, seed: int,
        lora_config: lorajax.LoraConfig | None = None, eval_every: int = 0,
        mode: str = "factored", log: bool = True) -> dict:
  """One fine-tuning run at constant LR; returns its loss curves.

  Args:
    model, params: The base model and its frozen params.
    data: (steps, batch, seq) training token windows.
    eval_tokens: (n, seq) held-out windows.
    method: "lora" (adapter of `lora_config`, initialised with `seed`) or
      "full" (all params trained).
    lr: Adam learning rate (betas 0.9, 0.999; no clipping, no decay).
    seed: Adapter initialisation seed (the data order is in `data`).
    lora_config: The adapter config for method="lora".
    eval_every: Held-out loss every this many steps (and at 0 and the end).
    mode: LoRA execution mode ("factored" or "merged").
    log: Print a line per evaluation.

  Returns:
    {"loss": per-step training loss, "eval_steps", "eval_loss",
     "seconds", "step_s" (median step wall time)}.
  """
  tx, ts = train_step(model, method, mode)
  if method == "lora":
    if lora_config is None:
      raise ValueError("method='lora' needs a `lora_config`.")
    trainable = lorajax.init(params, lora_config, key=jax.random.key(seed))
    frozen = params
  else:
    trainable = jax.tree.map(jnp.copy, params)
    frozen = None
  state = tx.init(trainable)
  state = state._replace(hyperparams={
      **state.hyperparams, "learning_rate": jnp.float32(lr)})
  steps = data.shape[0]
  every = eval_every or steps
  ev_tokens = jnp.asarray(eval_tokens)
  evals = [eval_loss(model, method, params, trainable, ev_tokens)]
  ev_steps = [0]
  losses, times = [], []
  t_start = time.perf_counter()
  for i in range(steps):
    ids = jnp.asarray(data[i][None])
    ones = jnp.ones_like(ids)
    t0 = time.perf_counter()
    trainable, state, m = ts.step(frozen, trainable, state, (ids, ones, ones))
    losses.append(float(m["loss"]))
    times.append(time.perf_counter() - t0)
    if (i + 1) % every == 0 or i + 1 == steps:
      evals.append(eval_loss(model, method, params, trainable, ev_tokens))
      ev_steps.append(i + 1)
      if log:
        print(f"  {method} lr={lr:.2g} seed={seed} step {i + 1}: train"
              f" {losses[-1]:.4f} held-out {evals[-1]:.4f}"
              f" ({times[-1]:.1f} s/step)", flush=True)
  return {"loss": losses, "eval_steps": ev_steps, "eval_loss": evals,
          "seconds": time.perf_counter() - t_start,
          "step_s": float(np.median(times[1:] if len(times) > 1 else times))}


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
