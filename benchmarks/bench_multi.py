"""Many adapters on one base: a mixed batch vs a single-adapter batch.

On the `bench_step` transformer stack, times (1) a factored training step
(value_and_grad + Adam; `lorajax.multi.per_slot(adam)` for the set) and (2)
a decoding step (one new token per example, forward only, no KV cache: the
per-token matmul shapes of decoding) for a batch whose examples use 1, 4 or
16 different adapters of a 16-slot set, per strategy (`gather`, `onehot`,
`ragged`), against the same batch with one ordinary adapter
(`lorajax.lora`). Medians after warm-up, variants timed round-robin in one
process; compile time separately. The ratio column is the median per-round
ratio to the single-adapter step.

  python benchmarks/bench_multi.py            # full size (minutes on a CPU)
  python benchmarks/bench_multi.py --smoke    # seconds, for CI
"""

import argparse
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
from lorajax import multi

TARGETS = r".*(attn|mlp)/.*/kernel"


class _Variant:
  def __init__(self, name, fn, args, n_adapters, strategy, kind):
    self.name, self.n_adapters, self.strategy = name, n_adapters, strategy
    self.kind = kind
    t0 = time.perf_counter()
    self.compiled = jax.jit(fn).lower(*args).compile()
    self.compile_s = time.perf_counter() - t0
    self.args, self.times = args, []

  def run(self):
    t0 = time.perf_counter()
    jax.block_until_ready(self.compiled(*self.args))
    return time.perf_counter() - t0


def _variants(args, kind):
  d, layers, vocab = args.width, args.layers, args.vocab
  heads = max(1, d // 64)
  params = bench_step.init_params(jax.random.key(0), layers=layers, d=d,
                                  vocab=vocab)
  seq = args.seq if kind == "train" else 1
  ids = jax.random.randint(jax.random.key(1), (args.batch, seq), 0, vocab)
  labels = jnp.roll(ids, -1, axis=1)
  fwd = lambda p, x: bench_step.forward(p, x, layers=layers,  # noqa: E731
                                        heads=heads)
  cfg = lorajax.LoraConfig(rank=args.rank, alpha=16.0, targets=TARGETS)
  adapters = [lorajax.init(params, cfg, key=jax.random.key(10 + k))
              for k in range(args.slots)]
  aset = multi.build(adapters)
  tx = optax.adam(1e-4)

  def xent(logits):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()

  out = []
  if kind == "train":
    def single(adapter, state):
      g = jax.grad(lambda a: xent(lorajax.lora(fwd)(params, a, ids)))(
          adapter)
      up, state = tx.update(g, state, adapter)
      return optax.apply_updates(adapter, up), state

    out.append(_Variant("single", single, (adapters[0], tx.init(adapters[0])),
                        1, None, kind))
    ptx = multi.per_slot(tx)
    for strategy in args.strategies:
      for n in args.mixes:
        ex_ids = jnp.arange(args.batch) % n

        def step(w, state, ex_ids, strategy=strategy):
          run = multi.lora(fwd, strategy=strategy)
          g = jax.grad(lambda w: xent(run(params, w, ex_ids, ids)))(w)
          up, state = ptx.update(g, state, w,
                                 active=multi.active_slots(ex_ids,
                                                           args.slots))
          return optax.apply_updates(w, up), state

        out.append(_Variant(f"{strategy}/{n}", step,
                            (aset.weights, ptx.init(aset.weights), ex_ids),
                            n, strategy, kind))
  else:
    out.append(_Variant(
        "single", lambda a: lorajax.lora(fwd)(params, a, ids),
        (adapters[0],), 1, None, kind))
    for strategy in args.strategies:
      for n in args.mixes:
        ex_ids = jnp.arange(args.batch) % n
        out.append(_Variant(
            f"{strategy}/{n}",
            lambda w, e, s=strategy: multi.lora(fwd, strategy=s)(
                params, w, e, ids),
            (aset.weights, ex_ids), n, strategy, kind))
  return out


def bench(args, kind):
  vs = _variants(args, kind)
  _timing.round_robin(vs, warmup=args.warmup, repeats=args.repeats)
  base = vs[0]
  rows = []
  for v in vs:
    rows.append({
        "kind": kind, "variant": v.name, "strategy": v.strategy,
        "adapters_in_batch": v.n_adapters, "slots": args.slots,
        "batch": args.batch, "seq": args.seq if kind == "train" else 1,
        "d_model": args.width, "layers": args.layers, "rank": args.rank,
        "median_s": statistics.median(v.times), "min_s": min(v.times),
        "repeats": len(v.times),
        "ratio_to_single": _timing.median_ratio(v.times, base.times),
        "compile_s": v.compile_s,
    })
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--width", type=int, default=256)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--vocab", type=int, default=256)
  ap.add_argument("--slots", type=int, default=16)
  ap.add_argument("--mixes", type=int, nargs="+", default=[1, 4, 16])
  ap.add_argument("--strategies", nargs="+",
                  default=["gather", "onehot", "ragged"])
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--smoke", action="store_true",
                  help="tiny sizes, for CI; writes nothing to results/")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                "results"))
  args = ap.parse_args()
  if args.smoke:
    args.width, args.layers, args.rank, args.batch, args.seq = 32, 1, 2, 4, 8
    args.slots, args.mixes, args.warmup, args.repeats = 4, [1, 4], 1, 1
  env = {"jax": jax.__version__, "backend": jax.default_backend(),
         "device_kind": jax.devices()[0].device_kind,
         "cpu_count": os.cpu_count(), "machine": platform.machine()}
  rows = []
  for kind in ("train", "decode"):
    for r in bench(args, kind):
      r.update(env)
      print(json.dumps(r), flush=True)
      rows.append(r)
  if args.smoke:
    return
  os.makedirs(args.out, exist_ok=True)
  _timing.write_atomic(os.path.join(args.out, "multi.jsonl"),
                "".join(json.dumps(r) + "\n" for r in rows))
  lines = [
      "# Mixed-adapter batches vs a single-adapter batch", "",
      f"`python benchmarks/bench_multi.py` on {env['backend']}"
      f" ({env['device_kind']}, {env['cpu_count']} CPUs, jax {env['jax']}):"
      f" bench_step stack, d_model {args.width}, {args.layers} layers, rank"
      f" {args.rank}, a {args.slots}-slot set, batch {args.batch}, train seq"
      f" {args.seq}, decode 1 token per example. The machine is shared and"
      " noisy: compare ratios (round-robin, median per-round ratio), not"
      " absolute times.", "",
      "| kind | variant | adapters in batch | median ms | ratio to single |"
      " compile s |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['kind']} | {r['variant']} | {r['adapters_in_batch']} |"
        f" {1e3 * r['median_s']:.2f} | {r['ratio_to_single']:.2f} |"
        f" {r['compile_s']:.1f} |")
  _timing.write_atomic(os.path.join(args.out, "multi.md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
