"""Compile time against depth: scanned vs unrolled Llama layers.

For each depth, builds a tiny-width `lorajax.models.llama` model with its
layers unrolled (a Python loop: one copy of the layer per layer in the
program) and scanned (`jax.lax.scan` over stacked weights: one copy), and
compiles one factored LoRA train step (`lorajax.lora`, value_and_grad, Adam)
from abstract shapes (`jax.jit(step).lower(ShapeDtypeStructs).compile()`).
Reports the trace+lower time, the XLA compile time (wall seconds and CPU
seconds of this process: the CPU seconds do not count time lost to other jobs
on a shared machine), and, after warm-up, the median step time of the
compiled step on real arrays. Layouts and depths run
round-robin in one process, `--repeats` times each (a fresh function object
every time, so nothing is reused from JAX's caches).

  python benchmarks/bench_depth.py            # depths 4 16 32 (minutes)
  python benchmarks/bench_depth.py --smoke    # seconds, for CI
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

import lorajax
from lorajax.models import llama


def _config(args, depth, scan):
  return llama.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.width,
      intermediate_size=2 * args.width, num_hidden_layers=depth,
      num_attention_heads=4, num_key_value_heads=2, scan_layers=scan,
      remat=args.remat)


def _step_fn(model, tx):
  """A fresh train step function (new identity: no JAX cache hits)."""
  fwd = lorajax.lora(model.apply, strict=True)

  def loss(adapter, params, ids):
    logits = fwd(params, adapter, ids)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1], ids[:, 1:]).mean()

  def step(params, adapter, opt_state, ids):
    value, grads = jax.value_and_grad(loss)(adapter, params, ids)
    updates, opt_state = tx.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, value

  return step


class _Variant:
  """One (depth, layout): its abstract inputs, compile times and step times."""

  def __init__(self, args, depth, scan):
    self.depth, self.scan = depth, scan
    self.model = llama.LlamaModel(_config(args, depth, scan))
    self.tx = optax.adam(1e-3)
    self.lora = lorajax.LoraConfig(rank=args.rank)
    key = jax.random.key(0)
    init = lambda: llama.init_params(self.model.config, key=key)
    self.abstract_params = jax.eval_shape(init)
    adapter = jax.eval_shape(
        lambda: lorajax.init(self.abstract_params, self.lora, key=key))
    self.abstract = (self.abstract_params, adapter,
                     jax.eval_shape(self.tx.init, adapter),
                     jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32))
    self.lower_s, self.compile_s, self.step_s = [], [], []
    self.lower_cpu_s, self.compile_cpu_s = [], []
    self.compiled = None
    self.args = None

  def compile(self):
    step = _step_fn(self.model, self.tx)
    c0, t0 = time.process_time(), time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(1, 2)).lower(*self.abstract)
    c1, t1 = time.process_time(), time.perf_counter()
    self.compiled = lowered.compile()
    c2, t2 = time.process_time(), time.perf_counter()
    self.lower_s.append(t1 - t0)
    self.compile_s.append(t2 - t1)
    self.lower_cpu_s.append(c1 - c0)
    self.compile_cpu_s.append(c2 - c1)

  def run(self, args):
    if self.args is None:
      key = jax.random.key(0)
      params = llama.init_params(self.model.config, key=key)
      adapter = lorajax.init(params, self.lora, key=key)
      ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0,
                               args.vocab)
      self.args = (params, adapter, self.tx.init(adapter), ids)
    t0 = time.perf_counter()
    out = self.compiled(*self.args)
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    self.args = (self.args[0], out[0], out[1], self.args[3])
    return dt


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--depths", type=int, nargs="+", default=[4, 16, 32])
  ap.add_argument("--width", type=int, default=64)
  ap.add_argument("--vocab", type=int, default=256)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--seq", type=int, default=32)
  ap.add_argument("--remat", default="none", choices=llama.REMAT_POLICIES)
  ap.add_argument("--repeats", type=int, default=3,
                  help="compilations per variant (round-robin)")
  ap.add_argument("--steps", type=int, default=5,
                  help="timed steps per variant after one warm-up step")
  ap.add_argument("--smoke", action="store_true",
                  help="tiny sizes, for CI; writes nothing to results/")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                "results"))
  args = ap.parse_args()
  if args.smoke:
    args.depths, args.repeats, args.steps, args.seq = [1, 2], 1, 1, 8
  env = {"jax": jax.__version__, "backend": jax.default_backend(),
         "device_kind": jax.devices()[0].device_kind,
         "cpu_count": os.cpu_count(), "machine": platform.machine(),
         "load_avg_1m_start": os.getloadavg()[0]}
  variants = [_Variant(args, d, s) for d in args.depths for s in (False, True)]
  for _ in range(args.repeats):
    for v in variants:
      v.compile()
  for i in range(1 + args.steps):
    for v in variants:
      t = v.run(args)
      if i:
        v.step_s.append(t)
  env["load_avg_1m_end"] = os.getloadavg()[0]
  rows = []
  for v in variants:
    rows.append({
        "layers": v.depth, "layout": "scan" if v.scan else "unrolled",
        "width": args.width, "rank": args.rank, "remat": args.remat,
        "tokens": args.batch * args.seq,
        "lower_s": statistics.median(v.lower_s),
        "compile_s": statistics.median(v.compile_s),
        "compile_s_all": v.compile_s,
        "lower_cpu_s": statistics.median(v.lower_cpu_s),
        "compile_cpu_s": statistics.median(v.compile_cpu_s),
        "median_step_s": statistics.median(v.step_s),
        **env,
    })
    print(json.dumps(rows[-1]), flush=True)
  if args.smoke:
    return
  os.makedirs(args.out, exist_ok=True)
  _timing.write_atomic(os.path.join(args.out, "depth.jsonl"),
                "".join(json.dumps(r) + "\n" for r in rows))
  by = {(r["layers"], r["layout"]): r for r in rows}
  title = ("# Compile time against depth: scanned vs unrolled layers"
           f" ({env['device_kind']}, {env['cpu_count']} cores, jax"
           f" {env['jax']})")
  intro = (
      f"`lorajax.models.llama`, width {args.width}, vocab {args.vocab}, LoRA"
      f" rank {args.rank} on all linear layers, factored (`lorajax.lora`,"
      f" strict), Adam, batch {args.batch}x{args.seq}, remat"
      f" {args.remat!r}. One train step compiled from abstract shapes;"
      f" median of {args.repeats} round-robin compilations per variant"
      f" (trace+lower and XLA compile timed apart, in CPU seconds of the"
      " process, which other jobs on the machine do not inflate much, and in"
      " wall seconds), then the median of"
      f" {args.steps} steps after one warm-up. The machine is shared with"
      " other jobs and noisy (1-min load average"
      f" {env['load_avg_1m_start']:.1f} -> {env['load_avg_1m_end']:.1f});"
      " compare ratios in a row, not absolute numbers across runs.")
  header = ("| layers | unrolled trace+lower CPU s | unrolled compile CPU s"
            " | scan trace+lower CPU s | scan compile CPU s | total ratio"
            " unrolled/scan | unrolled compile wall s | scan compile wall s"
            " | unrolled step ms | scan step ms |")
  lines = [title, "", intro, "", header, "|---" * 10 + "|"]
  for d in args.depths:
    u, s = by[(d, "unrolled")], by[(d, "scan")]
    ratio = ((u["lower_cpu_s"] + u["compile_cpu_s"])
             / (s["lower_cpu_s"] + s["compile_cpu_s"]))
    lines.append(
        f"| {d} | {u['lower_cpu_s']:.2f} | {u['compile_cpu_s']:.2f} |"
        f" {s['lower_cpu_s']:.2f} | {s['compile_cpu_s']:.2f} | {ratio:.1f} |"
        f" {u['compile_s']:.1f} | {s['compile_s']:.1f} |"
        f" {1e3 * u['median_step_s']:.1f} | {1e3 * s['median_step_s']:.1f} |")
  _timing.write_atomic(os.path.join(args.out, "depth.md"), "\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
