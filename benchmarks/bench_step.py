"""Train-step time: full fine-tuning vs merged LoRA vs factored LoRA.

One step of `lorajax.make_train_step` (value_and_grad + optax Adam update) of
a decoder-style transformer stack, for full fine-tuning (the whole params tree
as the trainable argument), merged LoRA (`lorajax.merge` inside the loss) and
factored LoRA (`lorajax.lora`), at several ranks and widths.
Reports the median step time after warm-up, its ratio to full fine-tuning,
compile time, and XLA's memory estimate of the compiled step. All numbers in a
table come from one run of this script.

  python benchmarks/bench_step.py            # full size (minutes on a CPU)
  python benchmarks/bench_step.py --smoke    # seconds, for CI
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


def init_params(key, *, layers, d, vocab):
  keys = iter(jax.random.split(key, 8 * layers + 2))
  dense = lambda i, o: jax.random.normal(next(keys), (i, o)) / i**0.5  # noqa
  params = {"embed": {"embedding": jax.random.normal(next(keys), (vocab, d))}}
  for i in range(layers):
    params[f"layer_{i}"] = {
        "attn": {n: {"kernel": dense(d, d)} for n in ("q", "k", "v", "o")},
        "mlp": {"up": {"kernel": dense(d, 4 * d)},
                "down": {"kernel": dense(4 * d, d)}},
        "ln1": {"scale": jnp.ones(d)}, "ln2": {"scale": jnp.ones(d)},
    }
  params["lm_head"] = {"kernel": dense(d, vocab)}
  return params


def _norm(x, scale):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def forward(params, ids, *, layers, heads):
  x = params["embed"]["embedding"][ids]
  b, t, d = x.shape
  mask = jnp.tril(jnp.ones((t, t), bool))
  for i in range(layers):
    p = params[f"layer_{i}"]
    h = _norm(x, p["ln1"]["scale"])
    q, k, v = (h @ p["attn"][n]["kernel"] for n in ("q", "k", "v"))
    split = lambda z: z.reshape(b, t, heads, d // heads)  # noqa: E731
    s = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / (d // heads)**0.5
    a = jax.nn.softmax(jnp.where(mask, s, -1e9), -1)
    o = jnp.einsum("bhqk,bkhd->bqhd", a, split(v)).reshape(b, t, d)
    x = x + o @ p["attn"]["o"]["kernel"]
    h = _norm(x, p["ln2"]["scale"])
    x = x + jax.nn.gelu(h @ p["mlp"]["up"]["kernel"]) @ p["mlp"]["down"][
        "kernel"]
  return x @ params["lm_head"]["kernel"]


def make_step(mode, fwd, tx):
  """`lorajax.make_train_step` for one mode: the step of every mode is the
  library's, `step(params, trainable, opt_state, (ids, labels))`."""
  def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           labels).mean()

  if mode == "full":
    # Full fine-tuning: the "adapter" argument is the whole params tree.
    def loss(_, params, batch):
      return xent(fwd(params, batch[0]), batch[1])
  else:
    apply = (lorajax.lora(fwd) if mode == "factored"
             else lambda p, ad, ids: fwd(lorajax.merge(p, ad), ids))

    def loss(params, adapter, batch):
      return xent(apply(params, adapter, batch[0]), batch[1])

  return lorajax.make_train_step(loss, tx)


class _Config:
  """One compiled train step and the state it carries from call to call."""

  def __init__(self, mode, rank, args, d, params, ids, labels, fwd):
    self.mode, self.rank, self.d = mode, rank, d
    tx = optax.adam(1e-4)
    ts = make_step(mode, fwd, tx)
    if mode == "full":
      params = jax.tree.map(jnp.copy, params)  # Donated: a private copy.
      self.args = (None, params, ts.init(params), (ids, labels))
    else:
      config = lorajax.LoraConfig(rank=rank, alpha=32.0,
                                  targets=r".*(attn|mlp)/.*/kernel")
      adapter = lorajax.init(params, config, key=jax.random.key(2))
      self.args = (params, adapter, ts.init(adapter), (ids, labels))
    t0 = time.perf_counter()
    self.compiled = jax.jit(ts.step, donate_argnums=(1, 2)).lower(
        *self.args).compile()
    self.compile_s = time.perf_counter() - t0
    mem = self.compiled.memory_analysis()
    self.peak = None
    if mem is not None:
      self.peak = int(getattr(mem, "temp_size_in_bytes", 0)
                      + getattr(mem, "argument_size_in_bytes", 0)
                      + getattr(mem, "output_size_in_bytes", 0)
                      - getattr(mem, "alias_size_in_bytes", 0))
    self.times = []

  def run(self):
    """Runs one step; returns its wall time in seconds."""
    t0 = time.perf_counter()
    out = self.compiled(*self.args)
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - t0
    self.args = (self.args[0], out[0], out[1], self.args[3])
    return elapsed


def bench_width(args, d):
  """All configurations of one width, timed round-robin.

  Each round runs one step of every configuration in turn, so all of them
  see the same machine load; the ratio to full fine-tuning is the median over
  rounds of the per-round ratio.
  """
  vocab, layers, heads = args.vocab, args.layers, max(1, d // 64)
  params = init_params(jax.random.key(0), layers=layers, d=d, vocab=vocab)
  ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0,
                           vocab)
  labels = jnp.roll(ids, -1, axis=1)
  fwd = lambda p, ids: forward(p, ids, layers=layers, heads=heads)  # noqa
  configs = [_Config("full", None, args, d, params, ids, labels, fwd)]
  for rank in args.ranks:
    for mode in ("merged", "factored"):
      configs.append(_Config(mode, rank, args, d, params, ids, labels, fwd))
  _timing.round_robin(configs, warmup=args.warmup, repeats=args.repeats)
  full = configs[0]
  rows = []
  for c in configs:
    rows.append({
        "mode": c.mode, "rank": c.rank, "d_model": d, "layers": layers,
        "tokens": args.batch * args.seq,
        "median_step_s": statistics.median(c.times),
        "min_step_s": min(c.times), "repeats": len(c.times),
        "ratio_to_full": _timing.median_ratio(c.times, full.times),
        "compile_s": c.compile_s, "peak_bytes_estimate": c.peak,
    })
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--widths", type=int, nargs="+", default=[512, 1024])
  ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--vocab", type=int, default=256)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--smoke", action="store_true",
                  help="tiny sizes, for CI; writes nothing to results/")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                "results"))
  args = ap.parse_args()
  if args.smoke:
    args.widths, args.ranks, args.layers = [64], [4], 2
    args.batch, args.seq, args.warmup, args.repeats = 2, 16, 1, 2
  env = {"jax": jax.__version__, "backend": jax.default_backend(),
         "device_kind": jax.devices()[0].device_kind,
         "cpu_count": os.cpu_count(), "machine": platform.machine()}
  rows = []
  for d in args.widths:
    env["load_avg_1m_start"] = os.getloadavg()[0]
    for r in bench_width(args, d):
      r["load_avg_1m_end"] = os.getloadavg()[0]
      rows.append({**r, **env})
      print(json.dumps(rows[-1]), flush=True)
  if args.smoke:
    return
  os.makedirs(args.out, exist_ok=True)
  _timing.write_atomic(os.path.join(args.out, "bench_step.jsonl"),
                "".join(json.dumps(r) + "\n" for r in rows))
  loads = ", ".join(
      f"d={r['d_model']}: {r['load_avg_1m_start']:.1f} -> "
      f"{r['load_avg_1m_end']:.1f}" for r in rows if r["mode"] == "full")
  lines = [
      f"# Train step: full vs merged vs factored LoRA ({env['device_kind']},"
      f" {env['cpu_count']} cores, jax {env['jax']})", "",
      f"{args.layers} layers, {args.batch}x{args.seq} tokens, Adam. The"
      f" configurations of a width run round-robin ({args.warmup} warm-up"
      f" round(s), then {args.repeats} timed rounds), so all see the same"
      " machine load; the step time is the median over rounds, the ratio the"
      " median of the per-round ratios to full fine-tuning. Machine load"
      f" (1-min load average, start -> end): {loads}.", "",
      "| d_model | mode | rank | median step (s) | min step (s) | ratio to"
      " full | compile (s) | XLA memory estimate (MiB) |",
      "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    mem = ("" if r["peak_bytes_estimate"] is None
           else f"{r['peak_bytes_estimate'] / 2**20:.0f}")
    lines.append(
        f"| {r['d_model']} | {r['mode']} | {r['rank'] or ''} |"
        f" {r['median_step_s']:.3f} | {r['min_step_s']:.3f} |"
        f" {r['ratio_to_full']:.2f} | {r['compile_s']:.1f} | {mem} |")
  _timing.write_atomic(os.path.join(args.out, "bench_step.md"),
                "\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
