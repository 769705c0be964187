"""Train-step time: factored DoRA vs factored LoRA vs PEFT-style dense DoRA.

One `lorajax.make_train_step` step (value_and_grad + optax Adam) of the
`bench_step.py` transformer stack, with adapters on every attention and MLP
matrix, for:

- `lora-factored`: plain LoRA through `lorajax.lora` (the reference);
- `dora-factored`: DoRA through `lorajax.lora`: the per-output norm from
  `||W||^2`, `W^T a` and the `r x r` Gram matrix, no weight-shaped array;
- `dora-peft-dense`: DoRA as PEFT computes it: the output factored, but the
  norm from the dense `W + s * a @ b` formed every step (stop-gradient);
- `dora-merged`: `lorajax.merge` inside the loss (dense weight and dense
  weight gradient).

All configurations of a width run round-robin in one process after warm-up;
the ratio is the median of per-round ratios to `lora-factored`. Target
(issue 15): `dora-factored` at most 1.2x `lora-factored`.

  python benchmarks/bench_dora.py            # full size
  python benchmarks/bench_dora.py --smoke    # seconds, for CI
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import _timing
import bench_step

import lorajax
from lorajax._src.core import adapter as adapter_lib

MODES = ("lora-factored", "dora-factored", "dora-peft-dense", "dora-merged")


def _dense_norm(w, node):
  """PEFT's DoRA norm: `||W + s * a @ b||` from the dense sum, detached."""
  full = w.astype(jnp.float32) + adapter_lib.delta(node)
  axes = tuple(j for j, c in enumerate(node.axes) if c == "i")
  return jax.lax.stop_gradient(jnp.sqrt(jnp.sum(full * full, axis=axes)))


@contextlib.contextmanager
def _peft_style_norm():
  """Traces with the dense norm in place of the factored one (bench only)."""
  saved = adapter_lib.dora_norm
  adapter_lib.dora_norm = _dense_norm
  try:
    yield
  finally:
    adapter_lib.dora_norm = saved


class _Config:
  def __init__(self, mode, rank, d, params, ids, labels, fwd):
    self.mode, self.rank, self.d = mode, rank, d
    merged = mode == "dora-merged"
    apply = ((lambda p, ad, x: fwd(lorajax.merge(p, ad), x)) if merged
             else lorajax.lora(fwd))

    def loss(params, adapter, batch):
      logits = apply(params, adapter, batch[0])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, batch[1]).mean()

    ts = lorajax.make_train_step(loss, optax.adam(1e-4))
    config = lorajax.LoraConfig(rank=rank, alpha=32.0,
                                targets=r".*(attn|mlp)/.*/kernel",
                                use_dora=mode != "lora-factored")
    adapter = jax.jit(lambda p: lorajax.init(p, config,
                                             key=jax.random.key(2)))(params)
    self.args = (params, adapter, ts.init(adapter), (ids, labels))
    ctx = (_peft_style_norm() if mode == "dora-peft-dense"
           else contextlib.nullcontext())
    t0 = time.perf_counter()
    with ctx:
      self.compiled = jax.jit(ts.step, donate_argnums=(1, 2)).lower(
          *self.args).compile()
    self.compile_s = time.perf_counter() - t0
    self.times = []

  def run(self):
    t0 = time.perf_counter()
    out = self.compiled(*self.args)
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - t0
    self.args = (self.args[0], out[0], out[1], self.args[3])
    return elapsed


def bench_width(args, d, rank):
  vocab, layers, heads = args.vocab, args.layers, max(1, d // 64)
  params = bench_step.init_params(jax.random.key(0), layers=layers, d=d,
                                  vocab=vocab)
  ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0,
                           vocab)
  labels = jnp.roll(ids, -1, axis=1)

  def fwd(p, x):
    return bench_step.forward(p, x, layers=layers, heads=heads)

  configs = [_Config(m, rank, d, params, ids, labels, fwd) for m in MODES]
  _timing.round_robin(configs, warmup=args.warmup, repeats=args.repeats)
  ref = configs[0]
  return [{
      "mode": c.mode, "rank": rank, "d_model": d, "layers": layers,
      "tokens": args.batch * args.seq,
      "median_step_s": statistics.median(c.times), "min_step_s": min(c.times),
      "repeats": len(c.times),
      "ratio_to_lora_factored": _timing.median_ratio(c.times, ref.times),
      "compile_s": c.compile_s,
  } for c in configs]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--widths", type=int, nargs="+", default=[512, 1024])
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--vocab", type=int, default=256)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--smoke", action="store_true",
                  help="tiny sizes, for CI; writes nothing to results/")
  ap.add_argument("--tag", default="",
                  help="suffix of the result files (e.g. the device)")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                "results"))
  args = ap.parse_args()
  if args.smoke:
    args.widths, args.rank, args.layers = [64], 4, 2
    args.batch, args.seq, args.warmup, args.repeats = 2, 16, 1, 2
  env = {"jax": jax.__version__, "backend": jax.default_backend(),
         "device_kind": jax.devices()[0].device_kind,
         "cpu_count": os.cpu_count(), "machine": platform.machine()}
  rows = []
  for d in args.widths:
    load0 = os.getloadavg()[0]
    for r in bench_width(args, d, args.rank):
      rows.append({**r, **env, "load_avg_1m_start": load0,
                   "load_avg_1m_end": os.getloadavg()[0]})
      print(json.dumps(rows[-1]), flush=True)
  if args.smoke:
    return
  os.makedirs(args.out, exist_ok=True)
  name = "dora" + (f"_{args.tag}" if args.tag else "")
  _timing.write_atomic(
      os.path.join(args.out, f"{name}.jsonl"),
                           "".join(json.dumps(r) + "\n" for r in rows))
  lines = [
      f"# DoRA train step ({env['device_kind']}, {env['backend']},"
      f" jax {env['jax']})", "",
      f"{args.layers} layers, {args.batch}x{args.seq} tokens, rank"
      f" {args.rank}, Adam; adapters on every attention/MLP matrix. The four"
      f" configurations of a width run round-robin ({args.warmup} warm-up"
      f" round(s), {args.repeats} timed rounds); ratio = median of per-round"
      " ratios to factored LoRA. 1-min load average at start: "
      + ", ".join(f"d={r['d_model']}: {r['load_avg_1m_start']:.1f}"
                  for r in rows if r["mode"] == MODES[0]) + ".", "",
      "| d_model | mode | median step (s) | min step (s) | ratio to factored"
      " LoRA | compile (s) |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['d_model']} | {r['mode']} | {r['median_step_s']:.4f} |"
        f" {r['min_step_s']:.4f} | {r['ratio_to_lora_factored']:.2f} |"
        f" {r['compile_s']:.1f} |")
  _timing.write_atomic(
      os.path.join(args.out, f"{name}.md"),
                           "\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
