"""Policy-gradient RL on SmolLM2-135M (notebook 13): task, sampler, step.

- `addition_prompts(model)`: the task. Every pair `a, b` of 2-digit numbers
  (8,100 prompts) as the one-shot text prompt `"12 + 35 = 47\\n{a} + {b} = "`
  (no chat template: the model then writes the sum directly); the token ids
  are cached in `notebooks/.cache/` like `smol.corpus`.
- `reward(...)`: 1 if the completion starts with the decimal number `a + b`
  (optional leading whitespace, then a non-digit or the end), else 0.
- `make_pg_step(model, method)`: the policy-gradient step, built with
  `lorajax.make_train_step` (the train-step machinery of `lorajax.finetune`):
  loss = sum over the batch of `-advantage x log p(completion)` / batch size,
  the summed completion log-likelihood computed by `lorajax.finetune.loss_sums`
  with the advantages as token weights. LoRA runs the adapter factored
  (`lorajax.lora(model.apply)`); full fine-tuning trains
  the params themselves.
- `sample(...)`: completions drawn from the current policy with
  `model.generate(..., temperature=1.0, adapter=adapter)`: the adapter runs
  unmerged (factored) in the KV-cached decode, so nothing is merged per step.
- `expected_reward(...)`: the exact probability of the canonical answer (its
  digits, then a non-digit) on held-out prompts, by one teacher-forced pass.

Only lorajax's public API is used.
"""

import hashlib
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import smol

import lorajax
from lorajax import finetune
from lorajax.models import llama

TEMPLATE = "12 + 35 = 47\n{a} + {b} = "
NEW_TOKENS = 4  # Up to 3 digits of the sum and one token after them.
_NUMBER = re.compile(r"\s*(\d+)(\D|$)")


def addition_prompts(model: llama.LlamaModel) -> tuple[np.ndarray, np.ndarray]:
  """`(pairs, ids)`: all (a, b) in [10, 99]^2 and their prompt token ids.

  SmolLM2's tokenizer splits digits, so every prompt has the same length and
  `ids` is one `(8100, length)` int32 array. Cached in `notebooks/.cache/`.
  """
  pairs = np.array([(a, b) for a in range(10, 100) for b in range(10, 100)],
                   np.int32)
  digest = hashlib.sha256(
      f"{model.tokenizer.vocab_size}|{TEMPLATE}".encode()).hexdigest()[:16]
  path = smol.CACHE / f"smol_addition_{digest}.npz"
  if path.exists():
    with np.load(path, allow_pickle=False) as z:
      return z["pairs"], z["ids"]
  tok = model.tokenizer
  rows = [tok.encode(TEMPLATE.format(a=a, b=b), add_special_tokens=False)
          for a, b in pairs]
  if len({len(r) for r in rows}) != 1:
    raise ValueError("addition prompts tokenise to different lengths; the"
                     " task assumes digit-split tokenisation.")
  ids = np.asarray(rows, np.int32)
  smol.CACHE.mkdir(exist_ok=True)
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, pairs=pairs, ids=ids)
  tmp.replace(path)
  return pairs, ids


def reward(model: llama.LlamaModel, completions: np.ndarray,
           sums: np.ndarray) -> np.ndarray:
  """1.0 where the decoded completion starts with the number `sums`."""
  tok = model.tokenizer
  out = np.zeros(len(completions), np.float32)
  for i, (row, target) in enumerate(zip(completions, sums)):
    m = _NUMBER.match(tok.decode([int(t) for t in row]))
    out[i] = float(m is not None and int(m.group(1)) == int(target))
  return out


def group_advantages(rewards: np.ndarray, group: int) -> np.ndarray:
  """reward - mean reward of its group (consecutive `group` samples)."""
  r = rewards.reshape(-1, group)
  return (r - r.mean(axis=1, keepdims=True)).reshape(-1)


def _adam() -> optax.GradientTransformation:
  # The LR lives in the optimizer state: one compiled step serves every LR.
  return optax.inject_hyperparams(optax.adam)(learning_rate=1.0)


def make_pg_step(model: llama.LlamaModel, method: str):
  """`(tx, TrainStep)` of the policy-gradient loss for "lora" or "full".

  The batch is `(ids, attention_mask, weights)`, each `(1, batch, length)`
  (one microbatch): prompt + completion ids and per-token weights, the
  sequence's advantage on its completion tokens and 0 elsewhere.
  """
  if method == "lora":
    forward = lorajax.lora(model.apply)
  elif method == "full":
    def forward(params, trainable, ids, att):
      del params
      return model.apply(trainable, ids, att)
  else:
    raise ValueError(f"`method` must be 'lora' or 'full'; got {method!r}.")

  def loss_fn(params, trainable, batch):
    ids, att, weights = batch
    # sum_i A_i * (-log p(completion_i)): the policy-gradient surrogate;
    # the step divides by the weight, the number of sequences.
    s, _ = finetune.loss_sums(forward(params, trainable, ids, att), ids,
                              weights)
    return s, jnp.float32(ids.shape[0])

  tx = _adam()
  return tx, lorajax.make_train_step(loss_fn, tx, weighted=True,
                                     microbatched=True)


def sample(model: llama.LlamaModel, params: Any, trainable: Any, method: str,
           ids: np.ndarray, *, key: jax.Array) -> np.ndarray:
  """Completions `(batch, NEW_TOKENS)` sampled at temperature 1.

  LoRA: the base params with the adapter unmerged (factored); full: the
  fine-tuned params.
  """
  x = jnp.asarray(ids)
  if method == "lora":
    out = model.generate(params, x, NEW_TOKENS, temperature=1.0, key=key,
                         eos_id=[], adapter=trainable)
  else:
    out = model.generate(trainable, x, NEW_TOKENS, temperature=1.0, key=key,
                         eos_id=[])
  return np.asarray(out)


_EVAL: dict[Any, Any] = {}


def _digits(model: llama.LlamaModel) -> np.ndarray:
  tok = model.tokenizer
  ids = [tok.encode(str(d), add_special_tokens=False) for d in range(10)]
  if any(len(i) != 1 for i in ids):
    raise ValueError("expected single-token digits in the tokenizer.")
  return np.array([i[0] for i in ids], np.int32)


def eval_batch(model: llama.LlamaModel, pairs: np.ndarray,
               ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Teacher-forcing inputs for `expected_reward`: `(tokens, digit_mask)`.

  tokens = prompt + the digits of a + b (right-padded to 3 digits with a
  digit that is never scored); digit_mask marks the answer digits.
  """
  digits = _digits(model)
  n, length = ids.shape
  tokens = np.zeros((n, length + 3), np.int32)
  mask = np.zeros((n, length + 3), np.int32)
  tokens[:, :length] = ids
  for i, (a, b) in enumerate(pairs):
    s = str(int(a) + int(b))
    tokens[i, length:length + len(s)] = digits[[int(c) for c in s]]
    tokens[i, length + len(s):] = digits[0]
    mask[i, length:length + len(s)] = 1
  return tokens, mask


def expected_reward(model: llama.LlamaModel, method: str, params: Any,
                    trainable: Any, tokens: np.ndarray,
                    mask: np.ndarray) -> float:
  """Mean over prompts of p(canonical answer): p(digits) x p(non-digit next).

  A lower bound of the sampled expected reward (an answer with leading
  whitespace also earns the reward but is not counted here); exact and
  noise-free, from one forward pass.
  """
  key = (id(model), method)
  if key not in _EVAL:
    digits = jnp.asarray(_digits(model))
    lora_apply = lorajax.lora(model.apply)

    def f(params, trainable, tokens, mask):
      att = jnp.ones_like(tokens)
      if method == "lora":
        logits = lora_apply(params, trainable, tokens, att)
      else:
        logits = model.apply(trainable, tokens, att)
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      tgt = tokens[:, 1:]
      picked = jnp.take_along_axis(logp[:, :-1], tgt[..., None],
                                   axis=-1)[..., 0]
      m = mask[:, 1:].astype(jnp.float32)
      ans = jnp.sum(picked * m, axis=1)
      # The position that predicts the token after the last answer digit.
      last = jnp.sum(mask, axis=1) + jnp.argmax(mask, axis=1) - 1
      after = jnp.take_along_axis(logp, last[:, None, None], axis=1)[:, 0]
      p_digit = jnp.sum(jnp.exp(after[:, digits]), axis=-1)
      return jnp.mean(jnp.exp(ans) * (1.0 - p_digit))

    _EVAL[key] = jax.jit(f)
  return float(_EVAL[key](params, trainable, jnp.asarray(tokens),
                          jnp.asarray(mask)))


def greedy_accuracy(model: llama.LlamaModel, params: Any, trainable: Any,
                    method: str, pairs: np.ndarray, ids: np.ndarray) -> float:
  """Fraction of prompts whose greedy completion earns the reward."""
  x = jnp.asarray(ids)
  if method == "lora":
    out = model.generate(params, x, NEW_TOKENS, eos_id=[], adapter=trainable)
  else:
    out = model.generate(trainable, x, NEW_TOKENS, eos_id=[])
  return float(reward(model, np.asarray(out), pairs.sum(axis=1)).mean())


def run(model: llama.LlamaModel, params: Any, pairs: np.ndarray,
        ids: np.ndarray, eval_pairs: np.ndarray, eval_ids: np.ndarray, *,
        method: str, lr: float, seed: int, steps: int, prompts: int,
        group: int, lora_config: lorajax.LoraConfig | None = None,
        eval_every: int = 10, log: bool = True) -> dict:
  """One policy-gradient run; returns its reward curves.

  Each step draws `prompts` training prompts (with `seed`), samples `group`
  completions of each from the current policy, scores them, and takes one
  Adam step (constant `lr`) on the group-mean-baseline policy gradient.

  Returns:
    {"reward": per-step mean sampled reward, "eval_steps",
     "expected_reward" and "greedy_accuracy" on the held-out prompts,
     "seconds", "sample_s" and "step_s" (medians of wall time)}.
  """
  if (id(model), method) not in _STEPS:
    _STEPS[(id(model), method)] = make_pg_step(model, method)
  tx, ts = _STEPS[(id(model), method)]
  trainable, frozen, state = smol.init_training(
      tx, params, method, lr=lr, lora_config=lora_config, seed=seed)
  rng = np.random.default_rng(seed)
  ev_tokens, ev_mask = eval_batch(model, eval_pairs, eval_ids)

  def evaluate():
    return (expected_reward(model, method, params, trainable, ev_tokens,
                            ev_mask),
            greedy_accuracy(model, params, trainable, method, eval_pairs,
                            eval_ids))

  e, a = evaluate()
  out = {"reward": [], "eval_steps": [0], "expected_reward": [e],
         "greedy_accuracy": [a]}
  sample_s, step_s = [], []
  t_start = time.perf_counter()
  length = ids.shape[1]
  for i in range(steps):
    pick = rng.choice(len(ids), prompts, replace=False)
    x = np.repeat(ids[pick], group, axis=0)
    sums = np.repeat(pairs[pick].sum(axis=1), group)
    t0 = time.perf_counter()
    comp = sample(model, params, trainable, method, x,
                  key=jax.random.fold_in(jax.random.key(seed), i))
    sample_s.append(time.perf_counter() - t0)
    r = reward(model, comp, sums)
    adv = group_advantages(r, group)
    seq = np.concatenate([x, comp], axis=1)
    weights = np.zeros(seq.shape, np.float32)
    weights[:, length:] = adv[:, None]
    batch = (jnp.asarray(seq[None]), jnp.ones((1, *seq.shape), jnp.int32),
             jnp.asarray(weights[None]))
    t0 = time.perf_counter()
    trainable, state, _ = ts.step(frozen, trainable, state, batch)
    jax.block_until_ready(trainable)
    step_s.append(time.perf_counter() - t0)
    out["reward"].append(float(r.mean()))
    if (i + 1) % eval_every == 0 or i + 1 == steps:
      e, a = evaluate()
      out["eval_steps"].append(i + 1)
      out["expected_reward"].append(e)
      out["greedy_accuracy"].append(a)
      if log:
        print(f"  {method} lr={lr:.2g} seed={seed} step {i + 1}: sampled"
              f" reward {np.mean(out['reward'][-eval_every:]):.3f},"
              f" held-out expected reward {e:.3f}, greedy accuracy {a:.3f}"
              f" (sample {sample_s[-1]:.1f} s, step {step_s[-1]:.1f} s)",
              flush=True)
  out["seconds"] = time.perf_counter() - t_start
  out["sample_s"] = float(np.median(sample_s))
  out["step_s"] = float(np.median(step_s))
  return out


_STEPS: dict[Any, Any] = {}
