"""Reliability catalogue for `lorajax finetune` / `lorajax generate` (issue 13).

Every bad setting, bad file and fault is run through the real CLI
(`cli.main(argv)` in-process; a subprocess only where a signal is needed).
Each error case asserts: exit status 2, no traceback on stderr, a one
paragraph message naming the flag / file / line, and an output directory
that is absent, untouched, or resumable, never marked complete. Most cases
fail during validation, before the model loads (milliseconds).
"""

import builtins
import dataclasses
import errno
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import safetensors.numpy
from _finetune_testing import write_reverse_data, write_tiny_model

from lorajax._src.app import cli, run_dir
from lorajax._src.core import checkpoint as ckpt_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ---------------------------------------------------------------------------
# Shared fixtures: one tiny model, tiny data, one finished run to copy.


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("rel")
  model = write_tiny_model(d / "model")  # context length 256
  train = d / "train.jsonl"
  write_reverse_data(train, 32, seed=0)
  ev = d / "eval.jsonl"
  write_reverse_data(ev, 4, seed=1)
  return {"model": model, "train": train, "eval": ev, "dir": d}


def _ft(files, out, *extra, steps=2):
  return ["finetune", "--model", str(files["model"]), "--train",
          str(files["train"]), "--eval-examples", "0", "--batch-size", "4",
          "--lr", "2e-2", "--rank", "4", "--alpha", "8", "--steps",
          str(steps), "--no-progress", "--output", str(out), *extra]


@pytest.fixture(scope="module")
def done_run(files, tmp_path_factory):
  """A finished 2-step run with checkpoints at steps 1 and 2."""
  out = tmp_path_factory.mktemp("done") / "run"
  assert cli.main(_ft(files, out, "--save-every", "1")) == 0
  assert run_dir.checkpoint_manager(
      out / "checkpoints", __import__("lorajax").LoraConfig()
  ).all_steps() == [1, 2]
  return out


def _copy_run(done_run, tmp_path) -> pathlib.Path:
  dst = tmp_path / "run"
  shutil.copytree(done_run, dst)
  return dst


def _snapshot(path: pathlib.Path):
  if not path.exists():
    return None
  snap = {}
  for p in sorted([path, *path.rglob("*")]):
    st = p.lstat()
    data = p.read_bytes() if p.is_file() else None
    snap[str(p.relative_to(path))] = (st.st_mode, st.st_mtime_ns, data)
  return snap


def _run(argv, capsys):
  code = cli.main([str(a) for a in argv])
  cap = capsys.readouterr()
  return code, cap.out, cap.err


def _assert_clean_error(code, err, command, pattern):
  assert code == 2, err
  assert "Traceback" not in err, err
  assert "ERROR:absl" not in err and "Exception in thread" not in err, err
  lines = [ln for ln in err.strip().splitlines()
           if not ln.startswith(f"lorajax {command}: warning:")]
  assert len(lines) == 1, err  # One paragraph, one line.
  assert lines[0].startswith(f"lorajax {command}: error: "), err
  assert re.search(pattern, err), (pattern, err)


# ---------------------------------------------------------------------------
# Simulated permission problems (root may read anything, so as root the
# EACCES errors are injected into the system calls for the denied paths).


@pytest.fixture
def deny(monkeypatch):
  """`deny(path)`: make `path` unreadable (a file) or untraversable (a
  directory) for this process."""
  denied: list[str] = []
  real_stat, real_lstat, real_open = os.stat, os.lstat, builtins.open
  real_listdir, real_access = os.listdir, os.access

  def blocked(p, *, inside_only=False):
    try:
      p = os.path.abspath(os.fspath(p))
    except TypeError:
      return False
    for d in denied:
      if p.startswith(d + os.sep) or (not inside_only and p == d):
        return True
    return False

  def err(p):
    return PermissionError(errno.EACCES, "Permission denied", os.fspath(p))

  def stat(p, *a, **k):
    if not isinstance(p, int) and blocked(p, inside_only=True):
      raise err(p)
    return real_stat(p, *a, **k)

  def lstat(p, *a, **k):
    if blocked(p, inside_only=True):
      raise err(p)
    return real_lstat(p, *a, **k)

  def open_(p, *a, **k):
    if not isinstance(p, int) and blocked(p):
      raise err(p)
    return real_open(p, *a, **k)

  def listdir(p=".", *a, **k):
    if blocked(p):
      raise err(p)
    return real_listdir(p, *a, **k)

  def access(p, mode, *a, **k):
    if blocked(p) and mode & os.W_OK:
      return False
    return real_access(p, mode, *a, **k)

  def deny_(path: pathlib.Path, *, write_only=False):
    if not IS_ROOT:
      path.chmod(0o555 if write_only else 0o000)
      return
    denied.append(os.path.abspath(path))
    if write_only:
      monkeypatch.setattr(os, "access", access)
      return
    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "lstat", lstat)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "listdir", listdir)

  chmodded = []
  yield lambda p, **k: (chmodded.append(p), deny_(p, **k))
  if not IS_ROOT:
    for p in chmodded:
      p.chmod(0o755 if p.is_dir() else 0o644)


# ---------------------------------------------------------------------------
# The catalogue. Each case returns (argv, output dir, regex the message must
# match, expected state of the output dir: "absent", "untouched" or
# "resumable"), and says whether the error must come before the model loads.


@dataclasses.dataclass
class Case:
  setup: Callable
  pattern: str
  state: str = "absent"
  before_load: bool = True
  command: str = "finetune"


def _set(argv, flag, value):
  argv = list(argv)
  if flag in argv:
    argv[argv.index(flag) + 1] = str(value)
  else:
    argv += [flag, str(value)]
  return argv


def _flag_case(flag, value, pattern, **kw):
  def setup(f, t, deny):
    argv = _ft(f, t / "out")
    if flag == "--epochs":
      i = argv.index("--steps")
      argv[i:i + 2] = []
    return _set(argv, flag, value), t / "out"
  return Case(setup, pattern, **kw)


def _no_tokenizer(f, t, deny):
  m = t / "model"
  shutil.copytree(f["model"], m)
  (m / "tokenizer.json").unlink()
  return _set(_ft(f, t / "out"), "--model", m), t / "out"


def _unreadable_train(f, t, deny):
  p = t / "train.jsonl"
  shutil.copy(f["train"], p)
  deny(p)
  return _set(_ft(f, t / "out"), "--train", p), t / "out"


def _train_in_unreadable_dir(f, t, deny):
  d = t / "locked"
  d.mkdir()
  shutil.copy(f["train"], d / "train.jsonl")
  deny(d)
  return _set(_ft(f, t / "out"), "--train", d / "train.jsonl"), t / "out"


def _unreadable_model_weights(f, t, deny):
  m = t / "model"
  shutil.copytree(f["model"], m)
  deny(m / "model.safetensors")
  return _set(_ft(f, t / "out"), "--model", m), t / "out"


def _output_parent_is_file(f, t, deny):
  (t / "afile").write_text("x")
  return _ft(f, t / "afile" / "run"), t / "afile" / "run"


def _output_is_file(f, t, deny):
  (t / "out").write_text("x")
  return _ft(f, t / "out"), t / "out"


def _output_parent_not_writable(f, t, deny):
  (t / "ro").mkdir()
  deny(t / "ro", write_only=True)
  return _ft(f, t / "ro" / "run"), t / "ro" / "run"


def _output_not_empty(f, t, deny):
  (t / "out").mkdir()
  (t / "out" / "notes.txt").write_text("mine")
  return _ft(f, t / "out"), t / "out"


def _resume_empty(f, t, deny):
  (t / "out").mkdir()
  return _ft(f, t / "out", "--resume"), t / "out"


def _resume_missing(f, t, deny):
  return _ft(f, t / "nope", "--resume"), t / "nope"


def _resume_corrupt_config(f, t, deny):
  (t / "out").mkdir()
  (t / "out" / "config.json").write_text('{\n  "model": "x",\n  "tr')
  (t / "out" / "metrics.jsonl").write_text("")
  return _ft(f, t / "out", "--resume"), t / "out"


def _missing_train(f, t, deny):
  return _set(_ft(f, t / "out"), "--train", t / "missing.jsonl"), t / "out"


def _bad_json_train(f, t, deny):
  p = t / "bad.jsonl"
  p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n')
  return _set(_ft(f, t / "out"), "--train", p), t / "out"


def _missing_model(f, t, deny):
  return _set(_ft(f, t / "out"), "--model", t / "nope"), t / "out"


CASES = {
    # Numbers: non-finite, huge, negative, out of range.
    "alpha-inf": _flag_case("--alpha", "inf",
                            r"argument --alpha: expected a finite number in"
                            r" \(0, 1e\+06\]; got 'inf'"),
    "alpha-nan": _flag_case("--alpha", "nan", r"argument --alpha: .*'nan'"),
    "lr-inf": _flag_case("--lr", "inf", r"argument --lr: .*\(0, 1\]"),
    "lr-huge": _flag_case("--lr", "1e30", r"argument --lr: .*'1e30'"),
    "lr-zero": _flag_case("--lr", "0", r"argument --lr: .*\(0, 1\]"),
    "weight-decay-nan": _flag_case("--weight-decay", "nan",
                                   r"argument --weight-decay: .*\[0, 10\]"),
    "weight-decay-negative": _flag_case("--weight-decay", "-1",
                                        r"argument --weight-decay"),
    "epochs-inf": _flag_case("--epochs", "inf", r"argument --epochs: .*inf"),
    "steps-zero": _flag_case("--steps", "0", r"argument --steps: .*\[1, "),
    "steps-huge": _flag_case("--steps", str(10**30), r"argument --steps"),
    "seed-negative": _flag_case(
        "--seed", "-1", r"argument --seed: expected an integer in \[0,"
        r" 9223372036854775807\]; got '-1'"),
    "seed-beyond-64-bits": _flag_case("--seed", str(2**64),
                                      r"argument --seed: .*\[0, "),
    "seed-not-int": _flag_case("--seed", "1.5", r"argument --seed"),
    "batch-size-huge": _flag_case("--batch-size", str(10**12),
                                  r"argument --batch-size: .*\[1, 65536\]"),
    "batch-size-beyond-data": _flag_case(
        "--batch-size", "1000", r"--batch-size 1000 is larger than the 32"
        r" training examples in '.*train\.jsonl'\. Use --batch-size from 1"
        r" to 32"),
    "rank-beyond-weights": _flag_case(
        "--rank", "64", r"--rank 64 is larger than the smallest targeted"
        r" weight dimension, 16 \(model/layers/0/self_attn/k_proj/kernel,"
        r" shape \(32, 16\)\).* Use --rank from 1 to 16"),
    "rank-beyond-mlp-weights": Case(
        lambda f, t, d: (_set(_ft(f, t / "out", "--targets", "mlp"),
                              "--rank", 40), t / "out"),
        r"--rank 40 is larger than the smallest targeted weight dimension,"
        r" 32 "),
    "max-new-tokens-beyond-context": Case(
        lambda f, t, d: ([*_set(_set(_ft(f, t / "out"), "--eval",
                                     f["train"]), "--eval-examples", 4),
                          "--max-new-tokens", "300"], t / "out"),
        r"--max-new-tokens 300 is not below the model's context length 256"),
    "max-new-tokens-plus-prompt-beyond-context": Case(
        lambda f, t, d: ([*_set(_set(_ft(f, t / "out"), "--eval",
                                     f["train"]), "--eval-examples", 4),
                          "--max-new-tokens", "250"], t / "out"),
        r"--max-new-tokens 250 does not fit: the longest held-out prompt in"
        r" '.*train\.jsonl' takes \d+ tokens", before_load=False),
    "seq-len-beyond-context": _flag_case(
        "--seq-len", "512", r"--seq-len 512 exceeds the model's context"
        r" length 256\. Use --seq-len 256 or less"),
    "targets-bad-regex": _flag_case("--targets", "(", r"--targets '\('"),
    "targets-match-nothing": _flag_case("--targets", "nothing",
                                        r"--targets 'nothing' matches no"
                                        r" weight"),
    # Files.
    "missing-model": Case(_missing_model, r"Model path '.*nope' does not"
                          r" exist \(no such file"),
    "model-without-tokenizer": Case(_no_tokenizer, r"Model directory"
                                    r" '.*model' has no tokenizer\.json"),
    "model-weights-unreadable": Case(
        _unreadable_model_weights, r"Model file '.*model\.safetensors'"
        r" exists but the file may not be read: permission denied \(EACCES"),
    "missing-train": Case(_missing_train, r"--train file '.*missing\.jsonl'"
                          r" does not exist \(no such file"),
    "train-unreadable": Case(_unreadable_train, r"--train file"
                             r" '.*train\.jsonl' exists but the file may not"
                             r" be read: permission denied \(EACCES"),
    "train-in-unreadable-dir": Case(
        _train_in_unreadable_dir, r"--train file '.*locked/train\.jsonl'"
        r" cannot be reached: permission denied \(EACCES\)"),
    "train-bad-json-line": Case(_bad_json_train, r"bad\.jsonl:2: not valid"
                                r" JSON"),
    "output-parent-is-file": Case(_output_parent_is_file,
                                  r"--output '.*afile/run' cannot be created"
                                  r" and written: '.*afile' is a file, not a"
                                  r" directory"),
    "output-is-file": Case(_output_is_file, r"--output '.*out' is a file,"
                           r" not a directory", state="untouched"),
    "output-parent-not-writable": Case(
        _output_parent_not_writable, r"--output '.*ro/run' cannot be created"
        r" and written: the existing parent '.*ro' is not writable:"
        r" permission denied \(EACCES"),
    "output-not-empty": Case(_output_not_empty, r"Output directory '.*out'"
                             r" is not empty .* pass --resume",
                             state="untouched"),
    "resume-empty-dir": Case(_resume_empty, r"--resume: '.*out' is not a"
                             r" lorajax run directory \(it is empty: no run"
                             r" was started there.* without --resume",
                             state="untouched"),
    "resume-missing-dir": Case(_resume_missing, r"--resume: the run directory"
                               r" '.*nope' does not exist"),
    "resume-corrupt-config": Case(
        _resume_corrupt_config, r"settings file .*out/config\.json:3:3 is not"
        r" valid JSON", state="untouched"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_catalogue(name, files, tmp_path, capsys, deny):
  case = CASES[name]
  argv, out = case.setup(files, tmp_path, deny)
  before = _snapshot(out)
  code, stdout, err = _run(argv, capsys)
  _assert_clean_error(code, err, case.command, case.pattern)
  if case.before_load:
    assert "Loading model" not in stdout
  if case.state == "absent":
    assert not os.path.lexists(out)
  elif case.state == "untouched":
    assert _snapshot(out) == before
  assert not (out / "run.json").exists() or case.state == "untouched"


def test_debug_shows_traceback(files, tmp_path, monkeypatch):
  monkeypatch.setenv("LORAJAX_DEBUG", "1")
  with pytest.raises(cli.CliError, match="--batch-size 1000"):
    cli.main(_set(_ft(files, tmp_path / "out"), "--batch-size", 1000))


# ---------------------------------------------------------------------------
# Cases on a finished run (copied per test).


def test_corrupt_metrics_line_is_named(done_run, tmp_path, capsys):
  out = _copy_run(done_run, tmp_path)
  (out / "run.json").unlink()
  path = out / "metrics.jsonl"
  lines = path.read_text().splitlines()
  lines[0] = lines[0][:20]  # Damaged, and not the last line.
  path.write_text("\n".join(lines) + "\n")
  before = _snapshot(out)
  code, stdout, err = _run(_resume_argv(done_run, out), capsys)
  _assert_clean_error(code, err, "finetune",
                      r"metrics\.jsonl:1: damaged line in the run's metrics")
  assert "Loading model" not in stdout
  assert _snapshot(out) == before


def _resume_argv(done_run, out, steps=None):
  cfg = json.loads((done_run / "config.json").read_text())
  return ["finetune", "--model", cfg["model"], "--train", cfg["train"],
          "--eval-examples", "0", "--batch-size", "4", "--lr", "2e-2",
          "--rank", "4", "--alpha", "8", "--steps",
          str(steps or cfg["steps"]), "--no-progress", "--output", str(out),
          "--resume"]


def test_resume_completed_run_says_complete(done_run, tmp_path, capsys):
  out = _copy_run(done_run, tmp_path)
  before = _snapshot(out)
  code, stdout, err = _run(_resume_argv(done_run, out), capsys)
  assert code == 0, err
  assert "already complete (2 steps" in stdout
  assert "nan" not in stdout and "Traceback" not in err
  assert _snapshot(out) == before


def test_torn_metrics_tail_is_dropped_and_run_resumes(done_run, tmp_path,
                                                      capsys):
  out = _copy_run(done_run, tmp_path)
  (out / "run.json").unlink()
  with (out / "metrics.jsonl").open("a") as f:
    f.write('{"step": 3, "loss": 1.2')  # What a kill leaves.
  code, stdout, err = _run(_resume_argv(done_run, out, steps=3), capsys)
  assert code == 0, err
  assert re.search(r"warning: .*metrics\.jsonl:\d+: dropping the torn last"
                   r" line", err), err
  assert "Traceback" not in err
  steps = [r["step"] for r in run_dir.read_metrics(out / "metrics.jsonl")
           if "loss" in r]
  assert steps == [1, 2, 3]
  assert json.loads((out / "run.json").read_text())["steps"] == 3


def _corrupt_step(step_dir: pathlib.Path) -> None:
  for p in step_dir.rglob("*"):
    if p.is_file() and p.parent.name == "d":  # OCDBT data files.
      p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 3)])


def test_corrupt_newest_checkpoint_is_replaced(done_run, tmp_path, capsys):
  import lorajax

  out = _copy_run(done_run, tmp_path)
  (out / "run.json").unlink()
  _corrupt_step(out / "checkpoints" / "2")
  code, stdout, err = _run(_resume_argv(done_run, out), capsys)
  assert code == 0, err
  assert "from step 1 of 2" in stdout
  assert re.search(r"warning: Skipping corrupt checkpoint step 2", err), err
  assert "Traceback" not in err and "already exists" not in err
  assert (out / "run.json").exists()
  # Step 2 was saved again and reads back.
  with run_dir.checkpoint_manager(
      out / "checkpoints", lorajax.LoraConfig(rank=4, alpha=8.0)) as mngr:
    assert mngr.all_steps() == [1, 2]
    meta = mngr.metadata(2)
  assert meta["step"] == 2


# ---------------------------------------------------------------------------
# A full disk: one clear message; the details go to <run>/lorajax.log.


def test_full_disk_is_one_message_and_resumable(files, tmp_path, capsys,
                                                monkeypatch):
  real_save = ckpt_lib.CheckpointManager.save
  msg = ("RESOURCE_EXHAUSTED: Error writing \"opt_state.3/0.0\": Failed to"
         " write 2549 bytes to file 5: No space left on device"
         " [os_error_code='28']")

  def full_disk_save(self, step, *a, **k):
    # What orbax does: its writer thread logs the failure with a traceback
    # (absl / asyncio loggers), then the error reaches the main thread.
    def writer():
      try:
        raise ValueError(msg)
      except ValueError:
        logging.getLogger("absl").exception("_SignalingThread.run() raised")
        raise

    t = threading.Thread(target=writer)
    t.start()
    t.join()
    raise ValueError(msg)

  monkeypatch.setattr(ckpt_lib.CheckpointManager, "save", full_disk_save)
  out = tmp_path / "run"
  code, _, err = _run(_ft(files, out, "--save-every", "1", steps=2), capsys)
  _assert_clean_error(code, err, "finetune",
                      r"The disk is full \(no space left on device\).*"
                      r"--resume --output .*Details: .*lorajax\.log")
  log = (out / cli.LOG_FILE).read_text()
  assert "No space left on device" in log and "Traceback" in log
  assert "_SignalingThread.run() raised" in log
  assert (out / "config.json").exists() and not (out / "run.json").exists()
  # Resumable: with space again, --resume finishes the run (no checkpoint
  # was written, so it restarts from step 0 in place).
  monkeypatch.setattr(ckpt_lib.CheckpointManager, "save", real_save)
  code, stdout, err = _run(_ft(files, out, "--save-every", "1", "--resume",
                               steps=2), capsys)
  assert code == 0, err
  assert "restarts from step 0 of 2 in place" in stdout
  assert json.loads((out / "run.json").read_text())["steps"] == 2


def _unshare_available() -> bool:
  if shutil.which("unshare") is None:
    return False
  r = subprocess.run(["unshare", "-rm", "sh", "-c",
                      "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null ||"
                      " mount -t tmpfs -o size=64k tmpfs /tmp"],
                     capture_output=True, check=False)
  return r.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_available(),
                    reason="needs `unshare -rm` to mount a small tmpfs")
def test_full_disk_on_a_real_tiny_filesystem(files, tmp_path):
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  argv = _ft(files, mnt / "run", "--save-every", "1", steps=4)
  py = (f"import sys; sys.path.insert(0, {str(ROOT)!r});"
        f" from lorajax._src.app import cli; sys.exit(cli.main({argv!r}))")
  r = subprocess.run(
      ["unshare", "-rm", "sh", "-c",
       f"mount -t tmpfs -o size=120k tmpfs {mnt} && exec {sys.executable}"
       f" -c \"$0\"", py],
      capture_output=True, text=True, timeout=300, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)},
      cwd=ROOT)
  err = "\n".join(ln for ln in r.stderr.splitlines()
                  if ln.startswith("lorajax"))
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr and "ERROR:absl" not in r.stderr
  assert "The disk is full" in err, r.stderr[-3000:]
  assert "--resume --output" in err and "lorajax.log" in err


# ---------------------------------------------------------------------------
# Interrupted runs (real signals, in a subprocess) resume.


def _start_and_signal(files, out, sig):
  argv = _ft(files, out, steps=100000)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  proc = subprocess.Popen([sys.executable, "-m", "lorajax", *argv], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  metrics = out / "metrics.jsonl"
  while time.time() < deadline and proc.poll() is None:
    if (out / "config.json").exists() and metrics.exists():
      break  # The run has started; no checkpoint is due before the end.
    time.sleep(0.05)
  assert proc.poll() is None, proc.communicate()
  proc.send_signal(sig)
  stdout, stderr = proc.communicate(timeout=120)
  return proc.returncode, stdout, stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL],
                         ids=["SIGINT", "SIGKILL"])
def test_interrupt_before_first_checkpoint_resumes(files, tmp_path, capsys,
                                                   sig):
  out = tmp_path / "run"
  code, _, stderr = _start_and_signal(files, out, sig)
  assert not (out / "run.json").exists()
  assert not run_dir.latest_step(out / "checkpoints")
  if sig == signal.SIGINT:
    assert code == 1
    assert "Traceback" not in stderr
    msg = [ln for ln in stderr.splitlines() if "interrupted" in ln]
    assert msg and f"lorajax finetune --resume --output {out}" in msg[0]
  else:
    assert code == -signal.SIGKILL
  # What the message says works: --resume restarts in place from step 0.
  code, stdout, err = _run(_ft(files, out, "--resume", steps=2), capsys)
  assert code == 0, err
  assert "restarts from step 0 of 2 in place" in stdout
  steps = [r["step"] for r in run_dir.read_metrics(out / "metrics.jsonl")
           if "loss" in r]
  assert steps == [1, 2]
  assert json.loads((out / "run.json").read_text())["steps"] == 2


# ---------------------------------------------------------------------------
# Umask: the run directory is readable to collaborators as the umask says.


def test_run_files_follow_umask(done_run):
  mask = os.umask(0o022)
  os.umask(mask)
  for rel in ("config.json", "metrics.jsonl", "run.json", "loss.png",
              "adapter/adapter_config.json",
              "adapter/adapter_model.safetensors"):
    mode = (done_run / rel).stat().st_mode & 0o777
    assert mode == 0o666 & ~mask, (rel, oct(mode))
  for rel in ("", "adapter", "checkpoints"):
    mode = (done_run / rel).stat().st_mode & 0o777
    assert mode == 0o777 & ~mask, (rel, oct(mode))


# ---------------------------------------------------------------------------
# generate: adapters and their base model.


def _adapter_copy(done_run, tmp_path) -> pathlib.Path:
  a = tmp_path / "adapter"
  shutil.copytree(done_run / "adapter", a)
  return a


def _gen(adapter, *extra):
  return ["generate", "--adapter", str(adapter), "--prompt", "a b",
          "--max-new-tokens", "3", *extra]


def _edit_config(a, **kw):
  cfg = json.loads((a / "adapter_config.json").read_text())
  cfg.update(kw)
  (a / "adapter_config.json").write_text(json.dumps(cfg))


GEN_CASES = {
    "recorded-base-missing": (
        lambda a, f, t: (_edit_config(a, base_model_name_or_path=str(
            t / "moved_model")), _gen(a))[1],
        r"was trained on the base model '.*moved_model', which does not"
        r" exist here .* never substitutes another model: pass --model", True),
    "recorded-base-hub-name": (
        lambda a, f, t: (_edit_config(
            a, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M"),
            _gen(a))[1],
        r"'HuggingFaceTB/SmolLM2-135M', which does not exist here", True),
    "no-recorded-base": (
        lambda a, f, t: (_edit_config(a, base_model_name_or_path=None),
                         _gen(a))[1],
        r"does not record its base model .* Pass --model", True),
    "adapter-config-not-json": (
        lambda a, f, t: ((a / "adapter_config.json").write_text(
            '{"peft_type": "LORA",\n "r": 4,'), _gen(a))[1],
        r"adapter_config\.json:2:9: not valid JSON", True),
    "adapter-weights-truncated": (
        lambda a, f, t: ((a / "adapter_model.safetensors").write_bytes(
            (a / "adapter_model.safetensors").read_bytes()[:300]),
            _gen(a))[1],
        r"adapter_model\.safetensors' is not a readable safetensors file"
        r" \(300 bytes", False),
    "adapter-weights-not-safetensors": (
        lambda a, f, t: ((a / "adapter_model.safetensors").write_text(
            "PK\x03\x04 a zip, not safetensors"), _gen(a))[1],
        r"adapter_model\.safetensors' is not a readable safetensors file",
        False),
    "adapter-dir-missing": (
        lambda a, f, t: _gen(t / "no_such_adapter"),
        r"--adapter '.*no_such_adapter' does not exist", True),
    "max-new-tokens-beyond-context": (
        lambda a, f, t: _set(_gen(a, "--model", f["model"]),
                             "--max-new-tokens", 256),
        r"--max-new-tokens 256 is not below the model's context length 256",
        True),
    "model-without-tokenizer": (
        lambda a, f, t: (shutil.copytree(f["model"], t / "m"),
                         (t / "m" / "tokenizer.json").unlink(),
                         _gen(a, "--model", t / "m"))[2],
        r"Model directory '.*m' has no tokenizer\.json", True),
}


@pytest.mark.parametrize("name", list(GEN_CASES))
def test_generate_catalogue(name, done_run, files, tmp_path, capsys,
                            monkeypatch):
  setup, pattern, before_load = GEN_CASES[name]
  a = _adapter_copy(done_run, tmp_path)
  argv = setup(a, files, tmp_path)
  if before_load:
    def no_load(*a, **k):
      raise AssertionError("the model was loaded before validation")
    monkeypatch.setattr(cli, "_load_model", no_load)
  code, _, err = _run(argv, capsys)
  _assert_clean_error(code, err, "generate", pattern)


def test_generate_uses_recorded_base(done_run, tmp_path, capsys):
  # The recorded base exists: it is used (a working case, for contrast).
  code, stdout, err = _run(_gen(done_run), capsys)
  assert code == 0, err
  assert stdout.strip()


# ---------------------------------------------------------------------------
# Library: the documented errors.


def test_peft_load_names_file_not_safetensor_error(done_run, tmp_path):
  from lorajax import peft
  from lorajax.models import llama

  _, params = llama.from_pretrained(
      json.loads((done_run / "config.json").read_text())["model"])
  a = _adapter_copy(done_run, tmp_path)
  w = a / "adapter_model.safetensors"
  good = w.read_bytes()
  assert peft.load(a, params) is not None
  for bad in (good[: len(good) // 2], good[:7], b"not safetensors at all"):
    w.write_bytes(bad)
    with pytest.raises(ValueError, match=re.escape(str(w))) as info:
      peft.load(a, params)
    assert type(info.value) is ValueError  # Not SafetensorError.
  w.write_bytes(good)
  (a / "adapter_config.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"adapter_config\.json:1:2: not valid"
                     r" JSON"):
    peft.load(a, params)
  tensors = safetensors.numpy.load_file(w)
  assert tensors  # The weights file itself is intact again.
  assert np.isfinite(next(iter(tensors.values()))).all()


def test_checkpoint_restore_does_not_create_mistyped_dir(tmp_path):
  import jax

  import lorajax

  config = lorajax.LoraConfig(rank=2, alpha=4.0)
  params = {"dense": {"kernel": np.ones((4, 3), np.float32)}}
  adapter = lorajax.init(params, config, key=jax.random.key(0))
  typo = tmp_path / "chekpoints"
  mngr = lorajax.CheckpointManager(typo, config)
  assert mngr.all_steps() == [] and mngr.latest_step() is None
  with pytest.raises(FileNotFoundError, match="does not exist"):
    mngr.restore(adapter=adapter)
  mngr.close()
  assert not typo.exists()
  # Saving still creates it.
  with lorajax.CheckpointManager(typo, config) as mngr:
    mngr.save(1, adapter)
  assert (typo / "1").is_dir()


def test_read_metrics_torn_tail_and_corruption(tmp_path):
  p = tmp_path / "metrics.jsonl"
  p.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  warned = []
  assert run_dir.read_metrics(p, warn=warned.append) == [
      {"step": 1, "loss": 2.0}]
  assert "metrics.jsonl:2: dropping the torn last line" in warned[0]
  p.write_bytes(b'{"step": 1}\n' + b"\0" * 64)  # Power loss: NUL tail.
  assert run_dir.read_metrics(p, warn=warned.append) == [{"step": 1}]
  p.write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n')
  with pytest.raises(ValueError, match=r"metrics\.jsonl:2: damaged line"):
    run_dir.read_metrics(p)


@pytest.mark.parametrize("kw", [
    {"learning_rate": float("inf")}, {"learning_rate": float("nan")},
    {"learning_rate": -1e-3}, {"epochs": float("inf")},
    {"weight_decay": float("nan")}, {"max_grad_norm": float("inf")},
])
def test_library_train_config_rejects_non_finite_settings(kw):
  from lorajax import finetune

  (name,) = kw
  with pytest.raises(ValueError, match=f"`{name}` must be a finite number"):
    finetune.TrainConfig(**kw)
