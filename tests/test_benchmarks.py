"""The benchmark scripts run (smoke sizes) and emit well-formed JSON lines."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke_rows(script: str, *args: str) -> list[dict]:
  """Runs `benchmarks/<script> --smoke *args`; its JSON lines, parsed."""
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", script), "--smoke",
       *args], capture_output=True, text=True, timeout=300, check=True,
      env=dict(os.environ, PYTHONPATH=ROOT))
  return [json.loads(line) for line in out.stdout.splitlines()
          if line.startswith("{")]


def test_bench_step_smoke():
  rows = _smoke_rows("bench_step.py")
  assert [r["mode"] for r in rows] == ["full", "merged", "factored"]
  for r in rows:
    assert r["median_step_s"] > 0 and r["compile_s"] > 0
  assert rows[0]["ratio_to_full"] == 1.0


def test_bench_depth_smoke():
  rows = _smoke_rows("bench_depth.py")
  assert [(r["layers"], r["layout"]) for r in rows] == [
      (1, "unrolled"), (1, "scan"), (2, "unrolled"), (2, "scan")]
  for r in rows:
    assert r["compile_s"] > 0 and r["compile_cpu_s"] > 0
    assert r["median_step_s"] > 0


def test_bench_vs_peft_smoke():
  rows = _smoke_rows("bench_vs_peft.py")
  assert [r["framework"] for r in rows] == ["lorajax", "peft"]
  for r in rows:
    assert r["shape"] == "data" and r["median_step_s"] > 0
    assert r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0
  assert rows[1]["speedup_vs_peft"] == 1.0
  # Same model, data and optimizer: the losses after the same steps agree.
  assert abs(rows[0]["loss_last"] - rows[1]["loss_last"]) < 1e-2


def test_profile_step_smoke():
  rows = _smoke_rows("profile_step.py", "--steps", "1", "--trace-steps", "1")
  assert len(rows) == 1
  parts = {p["part"]: p for p in rows[0]["parts"]}
  # The tiny model's step has every kind of matmul, each with its FLOPs.
  for kind in ("projections", "output head", "LoRA factors", "attention"):
    p = parts[f"matmul: {kind}"]
    assert p["ms_per_step"] > 0 and p["gflop_per_step"] > 0, p
  assert abs(sum(p["share"] for p in parts.values()) - 1) < 0.01
  assert rows[0]["median_step_s"] > 0


def test_bench_generate_smoke():
  rows = _smoke_rows("bench_generate.py")
  assert [r["impl"] for r in rows] == [
      "lorajax", "lorajax+adapter sampled", "transformers"]
  for r in rows:
    assert r["tokens_per_s"] > 0 and r["tokens_per_cpu_s"] > 0
    assert len(r["loadavg_start"]) == 3 and len(r["loadavg"]) == 3
  # Greedy tokens of lorajax and transformers agree on the tiny checkpoint.
  assert rows[0]["greedy_agreement_batch1"] == 1.0
  assert rows[1]["adapter_rank"] == 16
