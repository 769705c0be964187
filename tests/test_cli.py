"""`lorajax finetune` / `lorajax generate` end to end on a tiny random model."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
from _finetune_testing import write_reverse_data, write_tiny_model

from lorajax._src.app import cli, run_dir

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("cli")
  model = write_tiny_model(d / "model")
  train = d / "train.jsonl"
  write_reverse_data(train, 32, seed=0)
  ev = d / "eval.jsonl"
  write_reverse_data(ev, 4, seed=1)
  return {"model": model, "train": train, "eval": ev, "dir": d}


def _args(files, out, *extra, steps=8):
  return ["finetune", "--model", str(files["model"]), "--train",
          str(files["train"]), "--eval", str(files["eval"]),
          "--eval-examples", "4", "--max-new-tokens", "4", "--batch-size",
          "4", "--lr", "2e-2", "--rank", "8", "--alpha", "8", "--steps",
          str(steps),
          "--no-progress", "--output", str(out), *extra]


def _losses(out):
  return [r["loss"] for r in run_dir.read_metrics(out / "metrics.jsonl")
          if "loss" in r]


def test_finetune_end_to_end(files, tmp_path, capsys):
  out = tmp_path / "run"
  assert cli.main(_args(files, out, "--merged-weights", steps=12)) == 0
  printed = capsys.readouterr().out
  assert "Held-out exact match: before" in printed
  assert "Sample held-out answers" in printed
  # Every output is there; run.json (written last) marks completion.
  for name in ("config.json", "metrics.jsonl", "loss.png", "samples.json",
               "run.json", "adapter/adapter_config.json",
               "adapter/adapter_model.safetensors", "merged/config.json",
               "merged/model.safetensors"):
    assert (out / name).is_file(), name
  assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  summary = json.loads((out / "run.json").read_text())
  assert summary["complete"] and summary["steps"] == 12
  assert run_dir.latest_step(out / "checkpoints") == 12
  # The loss goes down.
  losses = _losses(out)
  assert len(losses) == 12
  assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3])
  evals = [r for r in run_dir.read_metrics(out / "metrics.jsonl")
           if "eval_loss" in r]
  assert [r["step"] for r in evals] == [0, 12]
  assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
  # PEFT export: rank 8 on all 7 linear layers of 2 blocks.
  cfg = json.loads((out / "adapter/adapter_config.json").read_text())
  assert cfg["r"] == 8 and cfg["peft_type"] == "LORA"
  tensors = safetensors.numpy.load_file(
      out / "adapter/adapter_model.safetensors")
  assert len(tensors) == 2 * 7 * 2
  # Merged weights differ from the base exactly by the adapter's delta.
  base = safetensors.numpy.load_file(files["model"] / "model.safetensors")
  merged = safetensors.numpy.load_file(out / "merged/model.safetensors")
  key = "model.layers.0.self_attn.q_proj.weight"
  a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A"
              ".weight"]
  b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B"
              ".weight"]
  scale = cfg["lora_alpha"] / cfg["r"]
  np.testing.assert_allclose(merged[key], base[key] + scale * b @ a,
                             rtol=1e-5, atol=1e-6)


def test_resume_continues_from_saved_step(files, tmp_path, capsys):
  full = tmp_path / "full"
  assert cli.main(_args(files, full, steps=6)) == 0
  part = tmp_path / "part"
  assert cli.main(_args(files, part, "--save-every", "2", steps=4)) == 0
  # Simulate a crash after step 4's checkpoint: the run marker is gone.
  (part / "run.json").unlink()
  # A run started before 0.2 named the storage dtype `dtype`: still resumes.
  cfg = json.loads((part / "config.json").read_text())
  cfg["lora"]["dtype"] = cfg["lora"].pop("param_dtype")
  (part / "config.json").write_text(json.dumps(cfg))
  capsys.readouterr()
  assert cli.main(_args(files, part, "--resume", steps=6)) == 0
  printed = capsys.readouterr().out
  assert "Resuming" in printed and "from step 4 of 6" in printed
  steps = [r["step"] for r in run_dir.read_metrics(part / "metrics.jsonl")
           if "loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6]
  # Same data order and state: the resumed losses match an uninterrupted run.
  np.testing.assert_allclose(_losses(part), _losses(full), rtol=1e-4)
  assert json.loads((part / "run.json").read_text())["steps"] == 6


def test_generate_with_adapter(files, tmp_path, capsys):
  out = tmp_path / "run"
  assert cli.main(_args(files, out, "--eval-examples", "0", steps=2)) == 0
  capsys.readouterr()
  assert cli.main(["generate", "--adapter", str(out), "--prompt", "a b",
                   "--prompt", "c d e", "--max-new-tokens", "3"]) == 0
  printed = capsys.readouterr().out
  assert "> a b" in printed and "> c d e" in printed


def test_python_m_lorajax_help():
  r = subprocess.run([sys.executable, "-m", "lorajax", "finetune", "--help"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120,
                     check=False)
  assert r.returncode == 0
  for opt in ("--model", "--train", "--eval", "--rank", "--alpha",
              "--targets", "--lr", "--steps", "--epochs", "--batch-size",
              "--grad-accum", "--seq-len", "--mode", "--seed", "--output",
              "--resume", "--merged-weights", "--eval-examples"):
    assert opt in r.stdout


# ---------------------------------------------------------------------------
# Bad input: a one-paragraph error, exit status 2, no completed run.


def _bad_jsonl(d, name, lines):
  p = d / name
  p.write_text("".join(lines))
  return p


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing-model", r"Model path '.*nope' does not exist"),
        ("model-dir-without-config", r"has no config\.json"),
        ("model-not-gguf", r"is not a \.gguf file"),
        ("model-broken", r"broken/config\.json:1:2 is not valid JSON"),
        ("bad-eval-line", r"evbad\.jsonl:1: missing field\(s\)"),
        ("missing-train", r"--train file '.*missing\.jsonl' does not exist"),
        ("bad-json-line", r"bad\.jsonl:2: not valid JSON"),
        ("missing-field", r"fields\.jsonl:1: missing field\(s\)"
         r" \['completion'\]"),
        ("too-long", r"longer than the sequence length 32 tokens, e\.g\."
         r" .*long\.jsonl:2 with \d+ tokens\. Raise `--seq-len`"),
        ("seq-len-over-context", r"--seq-len 512 exceeds the model's context"
         r" length 256"),
        ("targets-match-nothing", r"--targets 'nothing_here' matches no"
         r" weight of the model\. The model's 2-D weights \(3-D when"
         r" scan-stacked\) have paths like"
         r" model/"),
        ("resume-without-run", r"--resume: .* is not a lorajax run"),
    ],
)
def test_bad_input(files, tmp_path, capsys, case, match):
  d = tmp_path
  out = d / "out"
  args = _args(files, out, steps=2)

  def setarg(flag, value):
    args[args.index(flag) + 1] = str(value)

  if case == "missing-model":
    setarg("--model", d / "nope")
  elif case == "model-dir-without-config":
    (d / "empty").mkdir()
    setarg("--model", d / "empty")
  elif case == "model-not-gguf":
    (d / "w.bin").write_bytes(b"xx")
    setarg("--model", d / "w.bin")
  elif case == "model-broken":
    (d / "broken").mkdir()
    (d / "broken" / "config.json").write_text("{")
    setarg("--model", d / "broken")
  elif case == "bad-eval-line":
    setarg("--eval", _bad_jsonl(d, "evbad.jsonl", ['{"completion": "a"}\n']))
  elif case == "missing-train":
    setarg("--train", d / "missing.jsonl")
  elif case == "bad-json-line":
    setarg("--train", _bad_jsonl(d, "bad.jsonl", [
        '{"prompt": "a", "completion": "b"}\n', '{"prompt": "a",\n']))
  elif case == "missing-field":
    setarg("--train", _bad_jsonl(d, "fields.jsonl", ['{"prompt": "a"}\n']))
  elif case == "too-long":
    setarg("--train", _bad_jsonl(d, "long.jsonl", [
        '{"prompt": "a", "completion": "b"}\n',
        json.dumps({"prompt": "x" * 40, "completion": "y"}) + "\n"]))
    args += ["--seq-len", "32", "--batch-size", "2"]
  elif case == "seq-len-over-context":
    args += ["--seq-len", "512"]
  elif case == "targets-match-nothing":
    args += ["--targets", "nothing_here"]
  elif case == "resume-without-run":
    out.mkdir()
    args += ["--resume"]
  code = cli.main(args)
  err = capsys.readouterr().err
  assert code == 2
  assert err.startswith("lorajax finetune: error: ")
  assert "Traceback" not in err
  assert len(err.strip().splitlines()) <= 12  # one paragraph (+ path lists)
  assert __import__("re").search(match, err), err
  assert not (out / "run.json").exists()


def test_resume_with_different_config(files, tmp_path, capsys):
  out = tmp_path / "run"
  assert cli.main(_args(files, out, steps=2)) == 0
  capsys.readouterr()
  code = cli.main(_args(files, out, "--resume", "--rank", "2", steps=4))
  err = capsys.readouterr().err
  assert code == 2
  assert "was started with different settings (lora:" in err
  assert "'rank': 8" in err and "'rank': 2" in err
  # The completed run is left as it was.
  assert json.loads((out / "run.json").read_text())["steps"] == 2


def test_existing_output_is_not_overwritten(files, tmp_path, capsys):
  out = tmp_path / "run"
  out.mkdir()
  (out / "metrics.jsonl").write_text("")  # An incomplete earlier run.
  assert cli.main(_args(files, out, steps=2)) == 2
  err = capsys.readouterr().err
  assert "is not empty (it may hold an incomplete run)" in err
  assert "--resume" in err


def test_failed_run_is_not_marked_complete(files, tmp_path, capsys):
  # A base model whose weights hold a NaN: the loss is not finite, the run
  # stops with an error and the directory has no run.json. (A learning rate
  # large enough to overflow is now refused up front by --lr's range.)
  model = write_tiny_model(tmp_path / "nan_model")
  w = safetensors.numpy.load_file(model / "model.safetensors")
  w["model.layers.0.mlp.down_proj.weight"][0, 0] = np.nan
  safetensors.numpy.save_file(w, model / "model.safetensors")
  out = tmp_path / "run"
  args = _args(files, out, "--eval-examples", "0", steps=4)
  args[args.index("--model") + 1] = str(model)
  code = cli.main(args)
  err = capsys.readouterr().err
  assert code == 2
  assert "Lower the learning rate (`--lr`)" in err  # the flag, not the
  assert "TrainConfig" not in err                   # library's argument
  assert (out / "config.json").exists()
  assert not (out / "run.json").exists()


def test_epochs_and_grad_accum(files, tmp_path):
  out = tmp_path / "run"
  args = _args(files, out, "--grad-accum", "2", "--eval-examples", "0")
  i = args.index("--steps")
  args[i:i + 2] = ["--epochs", "1.5"]
  assert cli.main(args) == 0
  # ceil(1.5 epochs * 32 examples / (4 per batch * 2 micro-batches)) = 6.
  assert json.loads((out / "run.json").read_text())["steps"] == 6
  rows = [r for r in run_dir.read_metrics(out / "metrics.jsonl") if "loss" in r]
  assert len(rows) == 6
  assert all(r["padded"] % 8 == 0 for r in rows)  # 2 x 4 rows per step


def test_without_the_finetune_extra_says_how_to_install(monkeypatch, capsys):
  monkeypatch.setattr(cli, "FINETUNE_EXTRA", ("tqdm", "no_such_module_x"))
  assert cli.main(["finetune", "--steps", "1"]) == 2
  err = capsys.readouterr().err
  assert "needs the `finetune` extra" in err
  assert "no_such_module_x is not installed" in err
  assert "pip install 'lorajax[finetune]'" in err
  assert cli.missing_extras() == ["no_such_module_x"]
