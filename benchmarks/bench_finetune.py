"""Times the default `lorajax finetune` run end to end and records it.

Runs the command in-process (the same code path as the console script) into a
temporary directory, then writes one JSON line (wall time, median step time,
CPU seconds per step, compile time, accuracy before/after, machine load) to
benchmarks/results/finetune.jsonl and rewrites benchmarks/results/finetune.md.

The machine's load average is recorded because the step time depends on
other jobs; `cpu_s_per_step` (this process's CPU seconds, all threads) is
the contention-independent figure.

Usage:
  python benchmarks/bench_finetune.py [--smoke] [-- extra finetune options]
"""

import argparse
import json
import os
import pathlib
import platform
import resource
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true",
                      help="2 steps, 4 held-out examples; nothing recorded.")
  parser.add_argument("extra", nargs="*", help="more finetune options")
  args = parser.parse_args()

  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from lorajax._src.app import cli, run_dir  # noqa: PLC0415

  extra = list(args.extra)
  if args.smoke:
    extra += ["--steps", "2", "--eval-examples", "4", "--max-new-tokens", "8"]
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "run"
    t0 = time.perf_counter()
    c0 = time.process_time()
    code = cli.main(["finetune", "--no-progress", "--output", str(out),
                     *extra])
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if code != 0:
      sys.exit(code)
    summary = json.loads((out / "run.json").read_text())
    settings = json.loads((out / "config.json").read_text())
    steps = [r for r in run_dir.read_metrics(out / "metrics.jsonl")
             if "loss" in r]
  later = steps[1:] or steps
  row = {
      "bench": "finetune_default",
      "options": " ".join(extra) or "(defaults)",
      "mode": settings["mode"],
      "steps": summary["steps"],
      "batch_size": settings["batch_size"],
      "seq_len": settings["seq_len"],
      "wall_s": round(wall, 1),
      "process_cpu_s": round(cpu, 1),
      # The whole process: model loading, training and evaluation.
      "peak_rss_mib": round(resource.getrusage(
          resource.RUSAGE_SELF).ru_maxrss / 1024),
      "train_s": round(summary["train_seconds"], 1),
      "first_step_s": round(steps[0]["step_time"], 2),
      "median_step_s": round(float(np.median([r["step_time"]
                                              for r in later])), 2),
      "cpu_s_per_step": round(float(np.median([r["cpu_time"]
                                               for r in later])), 2),
      "tokens_per_s": round(float(np.median([r["tokens_per_s"]
                                             for r in later])), 1),
      "exact_match_before": summary["exact_match_before"],
      "exact_match_after": summary["exact_match_after"],
      "eval_examples": summary["eval_examples"],
      "loadavg_1m_before": round(load_before[0], 2),
      "loadavg_1m_after": round(os.getloadavg()[0], 2),
      "cpus": os.cpu_count(),
      "jax": jax.__version__,
      "device_kind": jax.devices()[0].device_kind,
      "machine": platform.machine(),
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
  }
  print(json.dumps(row))
  if args.smoke:
    return
  RESULTS.mkdir(parents=True, exist_ok=True)
  with (RESULTS / "finetune.jsonl").open("a") as f:
    f.write(json.dumps(row) + "\n")
  rows = [json.loads(x) for x in
          (RESULTS / "finetune.jsonl").read_text().splitlines() if x]
  cols = ["date", "options", "mode", "steps", "wall_s", "train_s",
          "first_step_s", "median_step_s", "cpu_s_per_step", "tokens_per_s",
          "peak_rss_mib",
          "exact_match_before", "exact_match_after", "eval_examples",
          "loadavg_1m_before", "loadavg_1m_after"]
  lines = [
      "# `lorajax finetune` default run",
      "",
      "SmolLM2-135M-Instruct, bundled word-reversal task, LoRA r=16 on all"
      " linear layers, batch 8. Written by `benchmarks/bench_finetune.py`."
      " `first_step_s` includes compilation; `cpu_s_per_step` is this"
      " process's CPU time per step (all threads), which does not depend on"
      " other jobs; wall-clock figures do (see the load averages: the"
      " machine has 2 cores).",
      "",
      "| " + " | ".join(cols) + " |",
      "|" + "---|" * len(cols),
  ]
  for r in rows:
    lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
  (RESULTS / "finetune.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
