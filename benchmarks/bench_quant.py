"""Quantized frozen bases: memory and step time of LoRA training.

SmolLM2-135M (the bundled GGUF) with its base weights in float32 (the
default load), int8 (per output channel), NF4 (QLoRA, blocks of 64) and the
file's own Q4_1/Q8_0 blocks (`from_pretrained(..., quantized=True)`). For each,
the jitted factored train step (`lorajax.lora(model.apply)`, Adam, LoRA r=16
on all linear layers) is compiled and measured:

- `base_bytes`: the params as held on the device;
- `args_bytes`, `temp_bytes`: `compiled.memory_analysis()` (arguments incl.
  params, adapter and optimizer state; XLA's temporaries);
- `peak_bytes`: `args + temps + outputs - aliased` (the step's own peak);
- `step_s`: median step time after warm-up (`block_until_ready`), compile
  time separately.

Each variant runs in its own process (`--variant`), one after the other, so
only one model is in memory at a time (the shared machine's memory is small);
step times are therefore not round-robin: compare them with the load average
recorded next to them.

Usage:
  python benchmarks/bench_quant.py [--smoke] [--steps N] [--batch B]
      [--seq S] [--out benchmarks/results]
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true",
                  help="a tiny random model, 2 timed steps (CI).")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--variant", default=None,
                  help="run one variant in this process (used internally).")
  ap.add_argument("--out", default=None,
                  help="directory for quant.jsonl / quant.md (default: print"
                  " only).")
  args = ap.parse_args()

  names = (["float32", "int8", "nf4", "q4_1"] if args.smoke else
           ["float32", "int8", "nf4", "gguf_q4_1"])
  if args.variant is None:
    import subprocess  # noqa: PLC0415

    lines = []
    for name in names:
      cmd = [sys.executable, __file__, "--variant", name, "--steps",
             str(args.steps), "--batch", str(args.batch), "--seq",
             str(args.seq), "--rank", str(args.rank)]
      if args.smoke:
        cmd.append("--smoke")
      res = subprocess.run(cmd, capture_output=True, text=True, check=False)
      got = [json.loads(x) for x in res.stdout.splitlines()
             if x.startswith("{")]
      if res.returncode or not got:
        print(f"variant {name} failed (rc {res.returncode}):"
              f" {res.stderr[-2000:]}", file=sys.stderr)
        continue
      lines.extend(got)
      print(json.dumps(got[0]), flush=True)
    _write(lines, args)
    return

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import optax  # noqa: PLC0415

  import lorajax  # noqa: PLC0415
  from lorajax._src.app.finetune import loss_sums  # noqa: PLC0415
  from lorajax.models import llama  # noqa: PLC0415

  if args.smoke:
    cfg = llama.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True)
    model = llama.LlamaModel(cfg)
    dense = llama.init_params(cfg, key=jax.random.key(0))
    steps, batch, seq = 2, 2, 16
  else:
    path = llama.default_model_path()
    model, dense = llama.from_pretrained(
        path, quantized=args.variant == "gguf_q4_1")
    steps, batch, seq = args.steps, args.batch, args.seq
  fmt = {"float32": None, "gguf_q4_1": None}.get(args.variant, args.variant)
  variants = {args.variant: dense if fmt is None
              else lorajax.quantize(dense, fmt)}
  del dense
  vocab = model.config.vocab_size
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(3, vocab, (batch, seq)), jnp.int32)
  att = jnp.ones((batch, seq), jnp.int32)
  lm = att.at[:, : seq // 2].set(0)
  config = lorajax.LoraConfig(rank=args.rank, alpha=32.0)
  opt = optax.adam(5e-4)
  fwd = lorajax.lora(model.apply)

  def loss_fn(adapter, params):
    s, n = loss_sums(fwd(params, adapter, ids, att), ids, lm)
    return s / n

  def step(params, adapter, opt_state):
    loss, g = jax.value_and_grad(loss_fn)(adapter, params)
    up, opt_state = opt.update(g, opt_state, adapter)
    return optax.apply_updates(adapter, up), opt_state, loss

  runs = {}
  for name, params in variants.items():
    adapter = lorajax.init(params, config, key=jax.random.key(0))
    opt_state = opt.init(adapter)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(1, 2)).lower(
        params, adapter, opt_state).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    adapter, opt_state, loss = compiled(params, adapter, opt_state)  # warm-up
    jax.block_until_ready(loss)
    runs[name] = dict(
        compiled=compiled, params=params, adapter=adapter,
        opt_state=opt_state, times=[], compile_s=compile_s,
        first_loss=float(loss),
        base_bytes=sum(int(np.prod(x.shape)) * x.dtype.itemsize
                       for x in jax.tree.leaves(params)),
        args_bytes=m.argument_size_in_bytes,
        temp_bytes=m.temp_size_in_bytes,
        peak_bytes=(m.argument_size_in_bytes + m.temp_size_in_bytes
                    + m.output_size_in_bytes - m.alias_size_in_bytes))
  for _ in range(steps):  # Round-robin: the machine's noise hits all alike.
    for r in runs.values():
      t0 = time.perf_counter()
      r["adapter"], r["opt_state"], loss = r["compiled"](
          r["params"], r["adapter"], r["opt_state"])
      jax.block_until_ready(loss)
      r["times"].append(time.perf_counter() - t0)
  lines = []
  for name, r in runs.items():
    st = statistics.median(r["times"])
    lines.append(dict(
        bench="quant", variant=name, smoke=args.smoke,
        model="tiny" if args.smoke else "SmolLM2-135M-Instruct",
        batch=batch, seq=seq, rank=args.rank, steps=steps,
        base_mb=round(r["base_bytes"] / 2**20, 1),
        args_mb=round(r["args_bytes"] / 2**20, 1),
        temp_mb=round(r["temp_bytes"] / 2**20, 1),
        peak_mb=round(r["peak_bytes"] / 2**20, 1),
        peak_bytes=r["peak_bytes"], step_s=round(st, 4),
        compile_s=round(r["compile_s"], 1),
        first_loss=round(r["first_loss"], 4),
        jax=jax.__version__, device=jax.devices()[0].device_kind,
        cpus=os.cpu_count(), load_avg=round(os.getloadavg()[0], 1),
        python=platform.python_version()))
  for line in lines:
    print(json.dumps(line), flush=True)


def _write(lines, args) -> None:
  """Adds the ratios to float32 and writes quant.jsonl / quant.md."""
  base = next((x for x in lines if x["variant"] == "float32"), None)
  for x in lines:
    if base is not None:
      x["peak_vs_float32"] = round(x["peak_bytes"] / base["peak_bytes"], 3)
      x["step_vs_float32"] = round(x["step_s"] / base["step_s"], 3)
  if args.out and lines:
    batch, seq = lines[0]["batch"], lines[0]["seq"]
    jax_version = lines[0]["jax"]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "quant.jsonl").open("w") as f:
      for line in lines:
        f.write(json.dumps(line) + "\n")
    rows = ["| base | base MB | step args MB | step temps MB | step peak MB"
            " | peak vs f32 | median step s | step vs f32 | compile s (load) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for x in lines:
      rows.append(
          f"| {x['variant']} | {x['base_mb']} | {x['args_mb']} |"
          f" {x['temp_mb']} | {x['peak_mb']} | {x.get('peak_vs_float32')} |"
          f" {x['step_s']} | {x.get('step_vs_float32')} | {x['compile_s']}"
          f" (load {x['load_avg']}) |")
    (out / "quant.md").write_text(
        f"# Quantized bases: LoRA train step on {lines[0]['model']}\n\n"
        f"Batch {batch} x {seq} tokens, LoRA r={args.rank} all-linear, Adam,"
        f" factored (`lorajax.lora`), jax {jax_version} on"
        f" {lines[0]['device']} ({os.cpu_count()} cores, shared with other"
        " jobs: the load average at the end of each variant is in the last"
        " column, so step times are noisy; one process per variant, run one"
        " after the other). Memory is XLA's compile-time"
        " `memory_analysis()` of the step, exact for the program.\n\n"
        + "\n".join(rows) + "\n")


if __name__ == "__main__":
  main()
