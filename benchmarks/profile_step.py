"""Where lorajax's SmolLM2 LoRA train step spends its time, on this CPU.

The step `bench_vs_peft.py` times (SmolLM2-135M from the bundled GGUF,
rank 16 alpha 32 on all linear layers, AdamW, the model loaded as `lorajax
finetune` loads it), profiled with XLA's per-operation trace
(`--xla_cpu_enable_xprof_traceme`, `jax.profiler.trace`) and attributed with
the compiled HLO (`--xla_dump_to`):

- matmuls, by kind: the decoder's projections, the output head, LoRA's thin
  factor products (rank in the output or the contraction), attention's
  batched products. Each with its time, FLOPs (from the HLO shapes and the
  number of executions in the trace) and achieved GFLOP/s.
- everything else, by what it is: the layer scan's stacking (dynamic slices
  of the stacked weights and residuals, their zero-initialised buffers),
  layout copies (transposes, reshapes), and elementwise work (norms,
  rotary, softmax, activations, the optimizer).

Times are summed per operation over `--trace-steps` traced steps and
divided by their number; operations that overlap on the two cores make the
sum exceed the step's wall time. Prints a markdown table; unless `--smoke`
or `--no-write`, appends one JSON line to
`benchmarks/results/profile_step.jsonl` and rewrites `profile_step.md`.

Usage: `PYTHONPATH=. python benchmarks/profile_step.py [--shape data]`.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import re
import shutil
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="random", choices=("random", "data"))
  p.add_argument("--remat", default=None,
                 help="`LlamaConfig.remat` (default: `lorajax finetune`'s).")
  p.add_argument("--steps", type=int, default=4, help="timed steps.")
  p.add_argument("--trace-steps", type=int, default=2)
  p.add_argument("--smoke", action="store_true",
                 help="tiny random model, nothing written.")
  p.add_argument("--no-write", action="store_true")
  p.add_argument("--tag", default="")
  return p.parse_args()


def _computations(hlo: str) -> dict[str, list[str]]:
  comps, cur = {}, None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      cur = m.group(1)
      comps[cur] = []
    elif cur:
      comps[cur].append(line)
  return comps


def _dims(shape: str) -> list[int]:
  m = re.match(r"\w+\[([\d,]*)\]", shape)
  return [int(x) for x in m.group(1).split(",") if x] if m else []


def _dot_kind(line: str, shapes: dict[str, str], rank: int, vocab: int):
  """`(kind, flops)` of one HLO dot instruction."""
  out = _dims(re.search(r"= (\S+) dot\(", line).group(1))
  lhs = re.search(r"dot\(([^,)]+)", line).group(1).strip()
  lhs_shape = lhs.split(" ")[0] if "[" in lhs else shapes.get(
      lhs.lstrip("%"), "")
  lhs_dims = _dims(lhs_shape)
  contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
  k = 1
  for c in (contract.group(1).split(",") if contract else []):
    if c and int(c) < len(lhs_dims):
      k *= lhs_dims[int(c)]
  n = 1
  for d in out:
    n *= d
  if vocab in out or k == vocab:
    kind = "matmul: output head"
  elif "lhs_batch_dims" in line:
    kind = "matmul: attention"
  elif rank in out or k == rank:
    kind = "matmul: LoRA factors"
  else:
    kind = "matmul: projections"
  return kind, 2.0 * n * k


def _other_kind(name: str, line: str) -> str:
  op = re.search(r'op_name="([^"]*)"', line)
  what = (op.group(1) if op else "") + " " + name
  if re.search(r"dynamic.slice|dynamic.update|dynamic_index|"
               r"dynamic_update|wrapped_broadcast", what):
    return "layer scan: slices, stacking, buffers"
  if re.search(r"transpose|reshape|copy|concatenate", name):
    return "layout copies"
  return "elementwise and reductions"


def _attribute(hlo: str, times: dict, rank: int, vocab: int) -> dict:
  """Per-kind `[ms per step, GFLOP per step]` from the HLO and the trace."""
  comps = _computations(hlo)
  out = collections.defaultdict(lambda: [0.0, 0.0])
  seen = set()
  for line in hlo.splitlines():
    m = re.search(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) (\w[\w\-]*)\(", line)
    if not m or m.group(1) not in times or m.group(3) == "parameter":
      continue
    name, op = m.group(1), m.group(3)
    if op in ("while", "conditional", "call"):
      continue  # Their bodies' operations are counted themselves.
    ms, count = times[name]
    seen.add(name)
    callee = re.search(r"calls=%([\w.\-]+)", line)
    body = comps.get(callee.group(1), []) if callee else [line]
    dots = [x for x in body if " dot(" in x]
    if dots:
      shapes = {}
      for x in body:
        mm = re.search(r"%([\w.\-]+) = (\S+) ", x)
        if mm:
          shapes[mm.group(1)] = mm.group(2)
      kind, flops = _dot_kind(dots[0], shapes, rank, vocab)
      out[kind][0] += ms
      out[kind][1] += flops * count / 1e9
    else:
      out[_other_kind(name, line)][0] += ms
  return dict(out)


def main() -> None:
  args = _parse()
  dump = tempfile.mkdtemp(prefix="profile_step_")
  os.environ["XLA_FLAGS"] = " ".join([
      os.environ.get("XLA_FLAGS", ""), "--xla_cpu_enable_xprof_traceme=true",
      f"--xla_dump_to={dump}", "--xla_dump_hlo_as_text"])
  sys.path.insert(0, str(ROOT))
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import bench_vs_peft as vs  # noqa: PLC0415
  import jax  # noqa: PLC0415

  # One batch for every step (`steps=1`): the traced program is the timed one.
  model, remat, _, batches, step = vs.lorajax_step(
      smoke=args.smoke, remat=args.remat, mode="default", shape=args.shape,
      steps=1)

  def one():
    return step(0)

  t0 = time.perf_counter()
  one()
  compile_s = time.perf_counter() - t0
  one()
  wall = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    one()
    wall.append(time.perf_counter() - t0)
  trace_dir = tempfile.mkdtemp(prefix="profile_trace_")
  with jax.profiler.trace(trace_dir):
    for _ in range(args.trace_steps):
      one()
  trace = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
  with gzip.open(trace[0]) as f:
    events = json.load(f)["traceEvents"]
  per_op = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    if e.get("ph") == "X":
      per_op[e["name"]][0] += e["dur"] / 1e3 / args.trace_steps
      per_op[e["name"]][1] += 1
  times = {k: (ms, n // args.trace_steps) for k, (ms, n) in per_op.items()}
  hlos = sorted(glob.glob(f"{dump}/*_step*after_optimizations.txt"),
                key=os.path.getsize)
  hlo = pathlib.Path(hlos[-1]).read_text()
  shutil.rmtree(dump, ignore_errors=True)
  shutil.rmtree(trace_dir, ignore_errors=True)
  parts = _attribute(hlo, times, vs.RANK, model.config.vocab_size)
  total_ms = sum(ms for ms, _ in parts.values())
  step_s = statistics.median(wall)
  flops = vs._flops(model.config.to_hf_dict(), batches[0])  # noqa: SLF001
  rows = [{"part": k, "ms_per_step": float(f"{ms:.4g}"),
           "share": round(ms / total_ms, 3),
           "gflop_per_step": float(f"{gf:.4g}") if gf else None,
           "gflops_per_s": float(f"{gf / ms * 1e3:.4g}") if gf and ms
           else None}
          for k, (ms, gf) in sorted(parts.items(), key=lambda kv: -kv[1][0])]
  result = {
      "bench": "profile_step", "shape": args.shape, "remat": remat,
      "median_step_s": round(step_s, 4), "compile_s": round(compile_s, 2),
      "op_ms_sum": round(total_ms, 1), "useful_gflop": round(flops / 1e9, 1),
      "useful_gflops_per_s": round(flops / 1e9 / step_s, 1), "parts": rows,
      "loadavg": [round(x, 2) for x in os.getloadavg()],
      "jax": jax.__version__, "cpu_count": os.cpu_count(),
      "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "smoke": args.smoke, "tag": args.tag}
  md = _markdown(result)
  print(md)
  print(json.dumps(result))
  if not args.smoke and not args.no_write:
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "profile_step.jsonl", "a") as f:
      f.write(json.dumps(result) + "\n")
    runs = [json.loads(x) for x in (RESULTS / "profile_step.jsonl")
            .read_text().splitlines() if x.strip()]
    (RESULTS / "profile_step.md").write_text(
        "# Where the SmolLM2 LoRA train step's time goes (CPU)\n\n"
        "Written by `benchmarks/profile_step.py` (see its docstring).\n\n"
        + "\n\n".join(_markdown(r) for r in runs) + "\n")


def _markdown(r: dict) -> str:
  lines = [
      f"## {r['time_utc']} {r['shape']}, remat {r['remat']} {r['tag']}",
      "",
      f"Median step {r['median_step_s']} s ({r['useful_gflops_per_s']}"
      f" useful GFLOP/s of {r['useful_gflop']} GFLOP), first step"
      f" {r['compile_s']} s, per-operation times summing to"
      f" {r['op_ms_sum']} ms (load average {r['loadavg']}).", "",
      "| part | ms per step | share | GFLOP | GFLOP/s |",
      "|---|---|---|---|---|"]
  for p in r["parts"]:
    lines.append(f"| {p['part']} | {p['ms_per_step']} | {p['share']} |"
                 f" {p['gflop_per_step'] or ''} | {p['gflops_per_s'] or ''} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
