"""Pretrains the tiny byte-level Llama used by the notebooks, from scratch.

Corpus: the Python documentation topics that ship with CPython
(`pydoc_data.topics.topics`), byte-tokenized; the last 5% is held out.
Writes results/tiny_pretrained.safetensors (about 0.5 MB) and
results/tiny_pretrained.json (settings, losses, time). Deterministic for a
given jax version and CPU: run `python pretrain_tiny.py` from notebooks/.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lab
from lorajax.models import llama

SETTINGS = {
    "config": {"width": 64, "layers": 2, "heads": 4, "kv_heads": 2,
               "ffn": 256, "max_len": 256},
    "steps": 400, "batch": 16, "seq": 128, "peak_lr": 5e-3,
    "warmup": 40, "weight_decay": 0.01, "seed": 0, "holdout_frac": 0.05,
}


def main(settings: dict = SETTINGS) -> dict:
  s = settings
  config = lab.tiny_config(**s["config"])
  model = llama.LlamaModel(config)
  ids = lab.encode(lab.pretrain_text())
  cut = int(len(ids) * (1 - s["holdout_frac"]))
  train_ids, held_ids = ids[:cut], ids[cut:]
  params = llama.init_params(config, key=jax.random.key(s["seed"]))
  sched = optax.warmup_cosine_decay_schedule(
      0.0, s["peak_lr"], s["warmup"], s["steps"], s["peak_lr"] / 10)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(sched, weight_decay=s["weight_decay"]))
  opt = tx.init(params)
  batches = lab.lm_batches(train_ids, steps=s["steps"], batch=s["batch"],
                           seq=s["seq"], seed=s["seed"])

  @jax.jit
  def step(params, opt, tokens):
    loss, g = jax.value_and_grad(
        lambda p: lab.lm_loss(model, p, tokens))(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, loss

  held = jnp.asarray(lab.lm_windows(held_ids, 128, s["seq"], seed=1))
  ft_eval = jnp.asarray(lab.lm_windows(lab.finetune_split()[1], 128,
                                       s["seq"], seed=1))
  evaluate = jax.jit(lambda p, t: lab.lm_loss(model, p, t))
  t0 = time.perf_counter()
  losses = []
  for i in range(s["steps"]):
    params, opt, loss = step(params, opt, jnp.asarray(batches[i]))
    losses.append(float(loss))
    if i % 50 == 0:
      print(f"step {i:5d}  loss {losses[-1]:.3f}", flush=True)
  seconds = time.perf_counter() - t0
  info = {
      "settings": s, "config": s["config"],
      "n_params": lab.n_params(params),
      "train_loss_last100": float(np.mean(losses[-100:])),
      "heldout_loss": float(evaluate(params, held)),
      "finetune_eval_loss_before_finetuning": float(evaluate(params, ft_eval)),
      "initial_loss": losses[0], "seconds": seconds,
      "loss_curve_every_50": losses[::50],
      "unit": "nats per byte", **lab.environment(),
  }
  from safetensors.numpy import save_file
  lab.RESULTS.mkdir(exist_ok=True)
  tmp = lab.RESULTS / ".tiny_pretrained.tmp"
  save_file(lab.flatten(params), str(tmp))
  tmp.replace(lab.PRETRAINED)
  tmp = lab.RESULTS / ".tiny_pretrained_json.tmp"
  tmp.write_text(json.dumps(info, indent=1) + "\n")
  tmp.replace(lab.PRETRAINED_INFO)
  print(json.dumps({k: v for k, v in info.items()
                    if k != "loss_curve_every_50"}, indent=1))
  return info


if __name__ == "__main__":
  main()
