"""LoRA training speed: lorajax vs PyTorch + PEFT on SmolLM2-135M, same CPU.

Two shapes, both on SmolLM2-135M-Instruct dequantized to float32 from the
bundled Q4_1 GGUF (lorajax `from_pretrained`; transformers
`from_pretrained(dir, gguf_file=...)`: the same numbers), LoRA rank 16,
alpha 32 on all linear layers (not the head), AdamW (lr 5e-4, no weight
decay) after clipping the global gradient norm to 1:

- `random`: batch 4 x 128 random token ids, loss on every token.
- `data`: the main job's own batches (`lorajax finetune` defaults: the
  bundled word-reversal task, batch 8, lengths bucketed by
  `lorajax.finetune`'s `Batcher`), loss on the completion tokens only;
  PEFT gets the same batches with the prompt and padding labels set to
  -100 (the same masking).

Every (framework, mode, shape) runs in its own process (a fresh Python per
round, so neither framework's thread pools or caches disturb the other);
rounds alternate between them, so a change in the machine's load hits every
variant alike. A worker loads the model, runs `--warmup` steps (lorajax's
first one compiles; its time is reported as `compile_s`), then times
`--steps` steps (each ends with the loss read back as a Python float, as a
training loop does). Per variant: the median over rounds of each round's
median step, and the best round. The machine's load average
(`os.getloadavg`) is recorded before every round.

Achieved FLOP/s: the step's useful FLOPs (counted analytically, the same
count for both frameworks: every projection's forward and input gradient,
the LoRA factors' forward and gradients, attention's score and value
products, the tied output head forward and input gradient; no dense weight
gradient) per second, against the machine's measured float32 matmul peak
(`--peak-n` square matmuls in jax and in torch, each in its own process).

Peak RSS (`ru_maxrss`) of every worker process is reported too (model
loading included).

Writes `benchmarks/results/vs_peft.jsonl` (one JSON line per variant) and
`vs_peft.md` unless `--smoke` (a tiny random model, one round, printed
only).
"""

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

RANK, ALPHA, LR = 16, 32.0, 5e-4


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true",
                 help="tiny random model, one round, nothing written.")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--shapes", default="random,data")
  p.add_argument("--modes", default="default,factored,merged",
                 help="lorajax modes to run (`default`: what `lorajax"
                 " finetune` picks); `MODE/REMAT` also sets the model's"
                 " `remat` (e.g. `default/none`, the step before"
                 " `remat=\"projections\"`).")
  p.add_argument("--peak-n", type=int, default=2048)
  p.add_argument("--remat", default=None,
                 help="lorajax's `LlamaConfig.remat` (default: what `lorajax"
                 " finetune` loads the model with).")
  p.add_argument("--no-write", action="store_true")
  p.add_argument("--tag", default="", help="free text stored in each row.")
  p.add_argument("--threads", type=int, default=0,
                 help="0: each framework's default thread pool (2 threads"
                 " here); 1: one thread each (XLA"
                 " --xla_cpu_multi_thread_eigen=false, torch"
                 " set_num_threads(1)), where CPU time is the work done.")
  # Internal: run one worker.
  p.add_argument("--worker", default=None,
                 help=argparse.SUPPRESS)
  p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
  p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
  return p.parse_args()


# ---------------------------------------------------------------------------
# Shared pieces (run inside the workers).


def _time_steps(one, args, n_batches: int):
  """Warm-up (timed as compile), then `args.steps` timed steps.

  `one(i)` runs step `i` and returns its loss as a Python float. Returns
  `(losses, wall seconds per step, CPU seconds per step, compile seconds)`.
  """
  t0 = time.perf_counter()
  losses = [one(i) for i in range(max(args.warmup, 1))]
  compile_s = time.perf_counter() - t0
  if args.shape == "data":  # Every length bucket once before timing.
    for i in range(n_batches):
      one(i)
  times, cpu = [], []
  for i in range(args.steps):
    t0, c0 = time.perf_counter(), time.process_time()
    losses.append(one(i))
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return losses, times, cpu, compile_s


def _tiny_config():
  from lorajax.models import llama  # noqa: PLC0415

  return llama.LlamaConfig(
      vocab_size=512, hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      tie_word_embeddings=True, rope_theta=1e5, rms_norm_eps=1e-5)


def _load_lorajax(smoke: bool, remat: str):
  import dataclasses  # noqa: PLC0415

  import jax  # noqa: PLC0415

  from lorajax.models import llama  # noqa: PLC0415

  if smoke:
    cfg = dataclasses.replace(_tiny_config(), remat=remat)
    return llama.LlamaModel(cfg), llama.init_params(cfg, key=jax.random.key(0))
  return llama.from_pretrained(llama.default_model_path(), remat=remat)


def _batches(shape: str, smoke: bool, steps: int, tokenizer=None,
             vocab: int = 0):
  """A list of `(input_ids, attention_mask, loss_mask)` numpy triples, each
  `(batch, length)`; the timed steps cycle through them."""
  import numpy as np  # noqa: PLC0415

  if shape == "random":
    rng = np.random.default_rng(0)
    b, s = (2, 16) if smoke else (4, 128)
    out = []
    for _ in range(max(steps, 1)):
      ids = rng.integers(0, vocab, (b, s)).astype(np.int32)
      one = np.ones((b, s), np.int32)
      out.append((ids, one, one.astype(np.float32)))
    return out
  from lorajax._src.app import cli  # noqa: PLC0415
  from lorajax._src.app import data as data_lib  # noqa: PLC0415
  from lorajax._src.app import finetune as ft  # noqa: PLC0415

  if smoke:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(max(steps, 1)):
      ids = rng.integers(3, vocab, (2, 16)).astype(np.int32)
      att = np.ones_like(ids)
      att[1, 12:] = 0
      ids[1, 12:] = 0
      lm = np.zeros(ids.shape, np.float32)
      lm[0, 10:] = 1
      lm[1, 8:12] = 1
      out.append((ids, att, lm))
    return out
  examples = data_lib.load_dataset(cli._data_path(cli.DEFAULT_TRAIN),  # noqa: SLF001
                                   tokenizer, max_length=8192)
  config = ft.TrainConfig()
  batcher = data_lib.Batcher(
      examples, batch_size=config.batch_size,
      seq_len=ft._auto_seq_len(examples), seed=config.seed)  # noqa: SLF001
  out = []
  for i in range(steps):
    bt = batcher.batch(i)
    out.append((bt.input_ids[0], bt.attention_mask[0], bt.loss_mask[0]))
  return out


def _flops(hf_cfg: dict, batch) -> float:
  """Useful FLOPs of one LoRA train step on `batch` (see the module doc)."""
  ids = batch[0]
  b, s = ids.shape
  t = b * s
  d = hf_cfg["hidden_size"]
  f = hf_cfg["intermediate_size"]
  h = hf_cfg["num_attention_heads"]
  kvh = hf_cfg["num_key_value_heads"]
  hd = hf_cfg.get("head_dim") or d // h
  v = hf_cfg["vocab_size"]
  mats = [(d, h * hd), (d, kvh * hd), (d, kvh * hd), (h * hd, d),
          (d, f), (d, f), (f, d)]
  per_layer = sum(2 * i * o + 3 * RANK * (i + o) for i, o in mats) * 2 * t
  attn = 12 * b * s * s * h * hd
  head = 4 * t * d * v
  return float(hf_cfg["num_hidden_layers"] * (per_layer + attn) + head)


def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lorajax_step(*, smoke: bool, remat: str | None, mode: str, shape: str,
                 steps: int):
  """The lorajax train step this benchmark times, ready to run.

  The model loaded with `remat` (None: as `lorajax finetune` loads it),
  `TrainConfig`'s defaults with `mode` (`"default"`: what `lorajax finetune`
  picks). Returns `(model, remat, resolved mode, batches, one)`, where
  `one(i)` runs a step on batch `i` (cycling) and returns its loss.
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from lorajax import finetune as ft  # noqa: PLC0415

  if remat is None:
    from lorajax._src.app import cli  # noqa: PLC0415

    remat = cli.TRAIN_REMAT
  model, params = _load_lorajax(smoke, remat)
  cfg = ft.TrainConfig(mode=None if mode == "default" else mode)
  batches = _batches(shape, smoke, steps, getattr(model, "tokenizer", None),
                     model.config.vocab_size)
  state = ft.init_state(params, cfg, key=jax.random.key(0))
  step_fn = ft.make_train_step(model, cfg.optimizer(),
                               mode=cfg.resolved_mode).step
  adapter, opt = state.adapter, state.opt_state
  dev = [tuple(jnp.asarray(x)[None] for x in bt) for bt in batches]

  def one(i):
    nonlocal adapter, opt
    adapter, opt, m = step_fn(params, adapter, opt, dev[i % len(dev)])
    return float(m["loss"])

  return model, remat, cfg.resolved_mode, batches, one


def _worker_lorajax(args) -> dict:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  model, remat, mode, batches, one = lorajax_step(
      smoke=args.smoke, remat=args.remat, mode=args.mode, shape=args.shape,
      steps=args.steps)
  losses, times, cpu, compile_s = _time_steps(one, args, len(batches))
  hf_cfg = model.config.to_hf_dict()
  return {"framework": "lorajax", "mode": mode, "requested": args.mode,
          "remat": remat,
          "times": times, "cpu": cpu, "compile_s": compile_s,
          "loss_last": losses[-1],
          "hf_cfg": hf_cfg, "batches": batches, "jax": jax.__version__,
          "threads": 1 if args.threads == 1 else os.cpu_count(), "np": np}


def _torch_model(smoke: bool):
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  if smoke:
    from lorajax._src.models import hf_io  # noqa: PLC0415

    cfg = _tiny_config()
    _, params = _load_lorajax(True, "none")
    state = {k: torch.from_numpy(v.copy())
             for k, v in hf_io.to_hf_state(cfg, params).items()}
    hf_cfg = transformers.LlamaConfig(**{
        k: v for k, v in cfg.to_hf_dict().items()
        if k not in ("architectures", "torch_dtype")})
    model = transformers.LlamaForCausalLM(hf_cfg)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model, None
  from lorajax.models import llama  # noqa: PLC0415

  path = pathlib.Path(llama.default_model_path())
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32)
  return model, _tokenizer(path)


def _tokenizer(path):
  """The GGUF file's tokenizer, without loading lorajax's weights."""
  from lorajax._src.models import gguf_io  # noqa: PLC0415
  from lorajax._src.models.tokenizer import Tokenizer  # noqa: PLC0415

  fields, _ = gguf_io.read_gguf(str(path))
  return Tokenizer.from_gguf_fields(fields)


def _worker_peft(args) -> dict:
  import numpy as np  # noqa: PLC0415
  import peft  # noqa: PLC0415
  import torch  # noqa: PLC0415

  model, tok = _torch_model(args.smoke)
  hf_cfg = model.config.to_dict()
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
      lora_dropout=0.0, task_type="CAUSAL_LM"))
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
  batches = _batches(args.shape, args.smoke, args.steps, tok,
                     hf_cfg["vocab_size"])
  dev = []
  for ids, att, lm in batches:
    ids_t = torch.from_numpy(ids.astype(np.int64))
    labels = torch.where(torch.from_numpy(lm) > 0, ids_t, -100)
    dev.append((ids_t, torch.from_numpy(att.astype(np.int64)), labels))

  def one(i):
    ids, att, labels = dev[i % len(dev)]
    out = model(input_ids=ids, attention_mask=att, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss)

  losses, times, cpu, compile_s = _time_steps(one, args, len(dev))
  return {"framework": "peft", "mode": "peft", "requested": "peft",
          "times": times, "cpu": cpu, "compile_s": compile_s,
          "loss_last": losses[-1],
          "hf_cfg": hf_cfg, "batches": batches, "torch": torch.__version__,
          "peft": peft.__version__, "threads": torch.get_num_threads(),
          "np": np}


def _worker_peak(args) -> dict:
  n = args.peak_n
  reps = 3 if args.smoke else 5
  if args.worker == "peak-jax":
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      f(a, a).block_until_ready()
      times.append(time.perf_counter() - t0)
  else:
    import torch  # noqa: PLC0415

    a = torch.randn(n, n)
    a @ a
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      a @ a
      times.append(time.perf_counter() - t0)
  best = min(times)
  return {"worker": args.worker, "n": n, "gflops_best": 2 * n**3 / best / 1e9,
          "gflops_median": 2 * n**3 / statistics.median(times) / 1e9}


def _run_worker(args) -> None:
  sys.path.insert(0, str(ROOT))
  if args.threads == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false")
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)
  if args.worker.startswith("peak"):
    print(json.dumps(_worker_peak(args)), flush=True)
    return
  fn = _worker_lorajax if args.worker == "lorajax" else _worker_peft
  r = fn(args)
  batches = r.pop("batches")
  r.pop("np")
  hf_cfg = r.pop("hf_cfg")
  times = r.pop("times")
  cpu = r.pop("cpu")
  # The timed steps cycle through the batches: tokens of the timed steps.
  tok = [int(batches[i % len(batches)][1].sum()) for i in range(args.steps)]
  padded = [int(batches[i % len(batches)][0].size)
            for i in range(args.steps)]
  loss_tok = [int(batches[i % len(batches)][2][:, 1:].sum())
              for i in range(args.steps)]
  flops = [_flops(hf_cfg, batches[i % len(batches)])
           for i in range(args.steps)]
  total = sum(times)
  r.update(shape=args.shape, step_times_s=[round(t, 4) for t in times],
           median_step_s=statistics.median(times),
           tokens_per_s=sum(tok) / total,
           tokens_per_cpu_s=sum(tok) / sum(cpu),
           cpu_s_per_step=statistics.median(cpu),
           padded_tokens_per_s=sum(padded) / total,
           loss_tokens_per_step=statistics.mean(loss_tok),
           gflops_per_s=sum(flops) / total / 1e9,
           gflop_per_step=statistics.mean(flops) / 1e9,
           peak_rss_mib=_rss_mib())
  print(json.dumps(r), flush=True)


# ---------------------------------------------------------------------------
# The driver.


def _spawn(args, **kw) -> dict | None:
  cmd = [sys.executable, __file__, "--steps", str(args.steps), "--warmup",
         str(args.warmup), "--peak-n", str(args.peak_n), "--threads",
         str(args.threads)]
  if args.remat is not None and "remat" not in kw:
    cmd += ["--remat", args.remat]
  for k, v in kw.items():
    cmd += [f"--{k}", str(v)]
  if args.smoke:
    cmd.append("--smoke")
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  res = subprocess.run(cmd, capture_output=True, text=True, env=env,
                       check=False)
  rows = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
  if res.returncode or not rows:
    print(f"worker {kw} failed (rc {res.returncode}):\n{res.stderr[-3000:]}",
          file=sys.stderr)
    return None
  return rows[-1]


def main() -> None:
  args = _parse()
  if args.worker:
    _run_worker(args)
    return
  if args.smoke:  # Two worker processes, seconds each.
    args.rounds, args.steps, args.warmup, args.peak_n = 1, 2, 1, 256
    args.shapes, args.modes = "data", "default"
  shapes = args.shapes.split(",")
  modes = args.modes.split(",")
  peak_workers = () if args.smoke else ("peak-jax", "peak-torch")
  peaks = [r for w in peak_workers if (r := _spawn(args, worker=w))]
  variants = [(fw, m, s) for s in shapes
              for fw, m in [*(("lorajax", m) for m in modes),
                            ("peft", "peft")]]
  got: dict = {v: [] for v in variants}
  loads = []
  for rnd in range(args.rounds):
    order = variants if rnd % 2 == 0 else variants[::-1]
    for fw, m, s in order:
      load = os.getloadavg()
      loads.append(load[0])
      mode, _, remat = m.partition("/")
      kw = {"remat": remat} if remat else {}
      r = _spawn(args, worker=fw, mode=mode, shape=s, **kw)
      if r is None:
        continue
      r.update(round=rnd, loadavg_before=[round(x, 2) for x in load])
      got[(fw, m, s)].append(r)
      print(f"# round {rnd} {fw}/{m}/{s}: {r['median_step_s']:.3f} s/step"
            f" {r['tokens_per_s']:.0f} tok/s (load {load[0]:.2f})",
            file=sys.stderr, flush=True)
  peaks += [r for w in peak_workers if (r := _spawn(args, worker=w))]
  peak = max((p["gflops_best"] for p in peaks), default=float("nan"))
  env = {"cpu": platform.processor() or platform.machine(),
         "cpu_count": os.cpu_count(), "python": platform.python_version(),
         "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         "smoke": args.smoke, "tag": args.tag, "thread_setting":
         args.threads or "default",
         "peak_gflops": {p["worker"]: round(p["gflops_best"], 1)
                         for p in peaks}}
  rows = []
  for (fw, m, s), rs in got.items():
    if not rs:
      continue
    meds = [r["median_step_s"] for r in rs]
    toks = [r["tokens_per_s"] for r in rs]
    base = rs[0]
    row = {
        "bench": "vs_peft", "framework": fw, "mode": base["mode"],
        "requested": m, "shape": s, "rounds": len(rs),
        "median_step_s": round(statistics.median(meds), 4),
        "best_step_s": round(min(meds), 4),
        "tokens_per_s": round(statistics.median(toks), 1),
        "best_tokens_per_s": round(max(toks), 1),
        "tokens_per_cpu_s": round(statistics.median(
            [r["tokens_per_cpu_s"] for r in rs]), 1),
        "cpu_s_per_step": round(statistics.median(
            [r["cpu_s_per_step"] for r in rs]), 3),
        "gflop_per_step": round(base["gflop_per_step"], 2),
        "gflops_per_s": round(statistics.median(
            [r["gflops_per_s"] for r in rs]), 1),
        "frac_of_peak": round(statistics.median(
            [r["gflops_per_s"] for r in rs]) / peak, 3),
        "loss_tokens_per_step": base["loss_tokens_per_step"],
        "compile_s": round(statistics.median(
            [r["compile_s"] for r in rs]), 2),
        "peak_rss_mib": round(max(r["peak_rss_mib"] for r in rs)),
        "loss_last": round(base["loss_last"], 4),
        "per_round_step_s": [round(x, 3) for x in meds],
        "loadavg_before": [r["loadavg_before"][0] for r in rs],
        **{k: base[k] for k in ("remat", "jax", "torch", "peft", "threads")
           if k in base}, **env}
    rows.append(row)
  for s in shapes:
    ref = [r for r in rows if r["shape"] == s and r["framework"] == "peft"]
    for r in rows:
      if r["shape"] == s and ref:
        r["speedup_vs_peft"] = round(
            r["tokens_per_s"] / ref[0]["tokens_per_s"], 3)
        r["best_speedup_vs_peft"] = round(
            r["best_tokens_per_s"] / ref[0]["best_tokens_per_s"], 3)
        r["cpu_speedup_vs_peft"] = round(
            r["tokens_per_cpu_s"] / ref[0]["tokens_per_cpu_s"], 3)
  for r in rows:
    print(json.dumps(r), flush=True)
  if not args.smoke and not args.no_write:
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "vs_peft.jsonl", "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
    _write_md()


def _write_md() -> None:
  rows = [json.loads(x) for x in
          (RESULTS / "vs_peft.jsonl").read_text().splitlines() if x.strip()]
  cols = ["time_utc", "tag", "shape", "framework", "mode", "remat",
          "median_step_s",
          "best_step_s", "tokens_per_s", "speedup_vs_peft",
          "best_speedup_vs_peft", "cpu_s_per_step", "cpu_speedup_vs_peft",
          "gflops_per_s", "frac_of_peak",
          "compile_s", "peak_rss_mib", "loadavg_before"]
  lines = ["# LoRA training: lorajax vs PyTorch + PEFT (SmolLM2-135M, CPU)",
           "",
           "Written by `benchmarks/bench_vs_peft.py` (see its docstring for"
           " the method). Every row is one variant of one run: medians over"
           " rounds of each round's median step time; `best` is the best"
           " round. The machine is a shared 2-core x86_64 CPU: the load"
           " average before each round is recorded, and ratios measured in"
           " the same run are more trustworthy than absolute times."
           " `frac_of_peak` is the achieved FLOP/s over the best measured"
           " float32 matmul rate (jax or torch) of that run. `remat` is"
           " lorajax's `LlamaConfig.remat` (blank in rows written before"
           " the column existed: `none`).", "",
           "| " + " | ".join(cols) + " |",
           "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
  (RESULTS / "vs_peft.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
