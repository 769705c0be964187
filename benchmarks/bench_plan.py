"""`lorajax plan` on real model sizes and TPU topologies (compiler estimates).

For each configuration this compiles one real lorajax train step ahead of
time for a TPU slice that is not attached (libtpu's compiler, on this CPU
machine) and records the plan: per-chip HBM, fits, the estimated step time,
tokens/s, MFU, collectives and compile time. These are the TPU compiler's
estimates, NOT measurements on hardware.

  JAX_PLATFORMS=cpu nice python benchmarks/bench_plan.py [--quick]

Results: benchmarks/results/plan.jsonl (one JSON object per plan, appended
as each finishes) and benchmarks/results/plan.md (rendered from the JSONL).

Configurations: Llama-3.1-8B on v5p:2x2x2 and v6e:2x4 (8 chips, fsdp=8,
batch 8); Llama-3.1-70B on v5p:4x4x4 (64 chips, fsdp=64, batch 64) and on
the smallest v5p slice where the factored LoRA step fits (batch = one
sequence per chip); all at seq 4096, rank 16 on all linear layers, bf16 base
with float32 adapter and optimizer state; factored vs merged vs full
fine-tuning, remat none vs full. Then the compile time of the factored step
against depth (4, 16, 32 layers of Llama-3.1-8B on v5p:2x2x2).
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorajax._src.app import plan as plan_lib  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
V5P_SLICES = (("v5p:2x2x1", 4), ("v5p:2x2x2", 8), ("v5p:2x2x4", 16),
              ("v5p:2x4x4", 32), ("v5p:4x4x4", 64))


def run_one(out, label, **kw):
  t0 = time.perf_counter()
  try:
    rep = plan_lib.plan(**kw).to_dict()
  except Exception as e:  # noqa: BLE001 - record and go on
    rep = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
  rep.update(label=label, wall_seconds=time.perf_counter() - t0,
             request={k: v for k, v in kw.items()},
             host=platform.node(), when=datetime.datetime.now(
                 datetime.timezone.utc).isoformat(timespec="seconds"))
  with open(out, "a") as f:
    f.write(json.dumps(rep) + "\n")
  brief = {k: rep.get(k) for k in ("fits", "hbm_per_chip_bytes",
                                    "step_seconds_estimate", "mfu_estimate",
                                    "compile_seconds", "error")}
  print(label, json.dumps(brief), flush=True)
  return rep


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true",
                  help="8B on v5p:2x2x2 only, factored and merged, no remat.")
  ap.add_argument("--out", default=str(RESULTS / "plan.jsonl"))
  ap.add_argument("--only", default=None,
                  help="run only labels containing this string.")
  ap.add_argument("--render", action="store_true",
                  help="only re-render the markdown from the JSONL.")
  args = ap.parse_args(argv)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  if args.render:
    render(out, out.with_suffix(".md"))
    return 0
  common = dict(seq_len=4096, rank=16, alpha=32.0, targets="all-linear",
                precision="bf16")

  def b8(topo, mode, remat):
    return (f"8b/{topo}/{mode}/remat={remat}", dict(
        model="llama-3.1-8b", topology=topo, mesh="fsdp=8", batch_size=8,
        mode=mode, remat=remat, **common))

  def b70(mode, remat):
    return (f"70b/v5p:4x4x4/{mode}/remat={remat}", dict(
        model="llama-3.1-70b", topology="v5p:4x4x4", mesh="fsdp=64",
        batch_size=64, mode=mode, remat=remat, **common))

  def depth(n, scan):
    return (f"depth/8b/v5p:2x2x2/factored/remat=full/layers={n}/"
            f"{'scan' if scan else 'unrolled'}", dict(
                model="llama-3.1-8b", topology="v5p:2x2x2", mesh="fsdp=8",
                batch_size=8, mode="factored", remat="full", num_layers=n,
                scan_layers=scan, **common))

  # In priority order: compiles take minutes each on a small shared host,
  # and each result is appended as soon as it is done.
  jobs = [b8("v5p:2x2x2", "factored", "full"),
          b8("v5p:2x2x2", "merged", "full"),
          b8("v5p:2x2x2", "full", "full")]
  if not args.quick:
    jobs += [b8("v5p:2x2x2", "factored", "none"),
             b70("factored", "full"),
             b8("v6e:2x4", "factored", "full"),
             b8("v6e:2x4", "full", "full"),
             b70("full", "full"),
             ("smallest", None),
             depth(4, True), depth(16, True), depth(32, True),
             depth(4, False),
             b8("v5p:2x2x2", "merged", "none"), b8("v5p:2x2x2", "full", "none"),
             b8("v6e:2x4", "merged", "full"), b8("v6e:2x4", "factored", "none"),
             b8("v6e:2x4", "merged", "none"), b8("v6e:2x4", "full", "none"),
             b70("merged", "full"), b70("factored", "none"),
             b70("merged", "none"), b70("full", "none")]
  for label, kw in jobs:
    if args.only and args.only not in label:
      continue
    if label == "smallest":
      # The smallest v5p slice where the factored 70B step fits.
      for topo, chips in V5P_SLICES:
        rep = run_one(out, f"70b/smallest/{topo}/factored/remat=full",
                      model="llama-3.1-70b", topology=topo,
                      mesh=f"fsdp={chips}", batch_size=chips,
                      mode="factored", remat="full", **common)
        if rep.get("fits"):
          break
      continue
    run_one(out, label, **kw)
    render(out, out.with_suffix(".md"))
  render(out, out.with_suffix(".md"))
  return 0


def _gib(b):
  return "" if b is None else f"{b / 1024 ** 3:.1f}"


def render(jsonl: pathlib.Path, md: pathlib.Path) -> None:
  """Writes the markdown table of the newest record per label."""
  rows = {}
  for line in jsonl.read_text().splitlines():
    if line.strip():
      r = json.loads(line)
      rows[r["label"]] = r
  lines = [
      "# `lorajax plan`: compiler estimates for real model sizes",
      "",
      "**These are estimates of the TPU compiler (XLA via libtpu,"
      " `memory_analysis` / `cost_analysis`), compiled on a CPU-only host"
      " for TPU slices that were not attached. They are not measurements on"
      " hardware.** Step time is the compiler's cost-model estimate"
      " (`optimal_seconds`) where it gives one, else a roofline of its FLOP"
      " and byte counts (see `step_seconds_source` in the JSONL). MFU counts"
      " LoRA's actual FLOPs (no dense weight gradient) against the chip's"
      " peak bf16 rate. Compile times were taken on a shared, heavily"
      " loaded 2-core machine and are noisy.",
      "",
      "Seq 4096, rank 16 (alpha 32) on all linear layers, bf16 base,"
      " float32 adapter and AdamW state; `full` is full fine-tuning of all"
      " weights for comparison (AdamW state float32).",
      "",
      "| config | fits | HBM/chip GiB (of) | args GiB | temps GiB |"
      " step s | tokens/s | MFU | compile s | collectives (GiB/step/chip) |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for label, r in rows.items():
    if "error" in r:
      lines.append(f"| {label} | error: {r['error'][:120]} |||||||||")
      continue
    coll = ", ".join(f"{c['kind']} {c['bytes'] / 1024 ** 3:.2f}"
                     for c in r["collectives"])
    step = r["step_seconds_estimate"]
    tps = r["tokens_per_second_estimate"]
    mfu = r["mfu_estimate"]
    lines.append(
        f"| {label} | {'yes' if r['fits'] else '**no**'} |"
        f" {_gib(r['hbm_per_chip_bytes'])} ({_gib(r['hbm_capacity_bytes'])})"
        f" | {_gib(r['argument_bytes'])} | {_gib(r['temp_bytes'])} |"
        f" {'' if step is None else f'{step:.3g}'} |"
        f" {'' if tps is None else f'{tps:,.0f}'} |"
        f" {'' if mfu is None else f'{100 * mfu:.1f}%'} |"
        f" {r['compile_seconds']:.0f} | {coll} |")
  notes = [f"- {label}: {r['notes'][0]}" for label, r in rows.items()
           if r.get("notes") and not r.get("fits", True)]
  if notes:
    lines += ["", "Does not fit:", "", *notes]
  md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  sys.exit(main())
