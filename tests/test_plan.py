"""`lorajax plan`: end to end on the local (8 simulated CPU) devices always,
on a small TPU topology when libtpu is installed; a plan that does not fit;
bad flags. Expected FLOPs and bytes are computed by hand from the shapes."""

import importlib.util
import json
import math
import pathlib
import re
import sys

import pytest

from lorajax import plan as plan_lib
from lorajax._src.app import cli

TINY = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512}
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
FIELDS = ("fits", "hbm_per_chip_bytes", "hbm_capacity_bytes",
          "step_seconds_estimate", "tokens_per_second_estimate",
          "mfu_estimate", "compile_seconds", "collectives")


@pytest.fixture()
def tiny_config(tmp_path):
  p = tmp_path / "config.json"
  p.write_text(json.dumps(TINY))
  return p


def run_cli(capsys, *argv):
  code = cli.main(["plan", *map(str, argv)])
  out, err = capsys.readouterr()
  return code, out, err


def lora_flops_per_token(rank, seq):
  """Hand count (FACTS.md): per d_in x d_out matrix and token 4 d_in d_out
  (forward + input gradient) plus 6 r (d_in + d_out) when adapted;
  attention 12 * layers * seq * heads * head_dim."""
  h, f, kv, layers, vocab = 64, 128, 2 * 16, 2, 256
  mats = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]
  per_layer = sum(4 * i * o + 6 * rank * (i + o) for i, o in mats)
  head = 4 * h * vocab  # lm_head: frozen (not a LoRA target), input grad
  return layers * per_layer + head + 12 * layers * seq * 4 * 16


def check_fields(d):
  for k in FIELDS:
    assert k in d, k
  assert isinstance(d["fits"], bool)
  assert d["hbm_per_chip_bytes"] >= d["argument_bytes"] + d["temp_bytes"]
  assert d["compile_seconds"] > 0
  for c in d["collectives"]:
    assert set(c) >= {"kind", "bytes"} and c["bytes"] >= 0


def test_plan_on_local_cpu_devices(capsys, tiny_config):
  code, out, err = run_cli(
      capsys, "--model", tiny_config, "--topology", "local", "--mesh",
      "data=2,fsdp=4", "--batch-size", 8, "--seq-len", 32, "--rank", 4,
      "--targets", ".*layers/.*/kernel", "--json")
  assert code == 0, err
  d = json.loads(out)
  check_fields(d)
  assert d["fits"] is True and d["chips"] == 8
  # Timed on the local devices (no compiler estimate on CPU).
  assert d["step_seconds_estimate"] > 0
  assert d["tokens_per_second_estimate"] == pytest.approx(
      8 * 32 / d["step_seconds_estimate"])
  assert d["model_flops"] == pytest.approx(8 * 32 * lora_flops_per_token(
      4, 32))
  # Per-chip bytes of the frozen bf16 params under FSDP over 4 (the data
  # axis replicates): every matrix is sharded 4 ways, norms replicated.
  h, f, kv, vocab = 64, 128, 32, 256
  mats = 2 * (2 * h * h + 2 * h * kv + 3 * h * f) + 2 * vocab * h
  norms = 2 * 2 * h + h
  frozen = next(b["bytes"] for b in d["breakdown"]
                if b["name"] == "frozen params")
  assert frozen == 2 * (mats // 4 + norms)
  # FSDP gathers weights: the program has all-gathers.
  assert any(c["kind"] == "all-gather" and c["bytes"] > 0
             for c in d["collectives"])


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed")
def test_plan_on_a_tpu_topology(capsys, tiny_config):
  # Scanned layers (stacked adapters) with remat, on a 2x2 v5e slice.
  report = plan_lib.plan(tiny_config, topology="v5e:2x2", mesh="fsdp=4",
                         batch_size=8, seq_len=64, rank=4, mode="factored",
                         scan_layers=True, remat="full")
  d = report.to_dict()
  check_fields(d)
  assert d["chip"] == "v5e" and d["chips"] == 4
  assert d["hbm_capacity_bytes"] == 16 * 1024 ** 3
  assert d["fits"] is True
  assert d["step_seconds_estimate"] > 0
  assert 0 < d["mfu_estimate"] <= 1
  assert math.isclose(
      d["mfu_estimate"], d["model_flops"] / (
          4 * 197e12 * d["step_seconds_estimate"]), rel_tol=1e-9)
  kinds = {c["kind"] for c in d["collectives"]}
  assert "all-gather" in kinds
  assert "FITS" in report.to_text()
  # All linear layers of both (stacked) layers are adapted: rank 4 factors
  # of q, k, v, o, gate, up, down.
  h, f, kv = 64, 128, 32
  mats = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]
  assert d["trainable_params"] == 2 * sum(4 * (i + o) for i, o in mats)


def test_plan_that_does_not_fit_names_the_biggest_consumers(capsys):
  # A vocabulary of 4M x 8192 in float32, fully fine-tuned: the embedding
  # and head alone are 2 x 16 GiB per chip on 8 chips, Adam twice that.
  huge = dict(TINY, vocab_size=1 << 22, hidden_size=8192,
              num_attention_heads=8, num_key_value_heads=8,
              num_hidden_layers=1)
  topology = "v5e:2x2" if HAS_LIBTPU else "local"
  mesh = "fsdp=4" if HAS_LIBTPU else "fsdp=8"
  report = plan_lib.plan(huge, topology=topology, mesh=mesh, batch_size=8,
                         seq_len=16, rank=4, mode="full", precision="f32")
  assert report.fits is False
  assert report.hbm_per_chip_bytes > report.hbm_capacity_bytes
  note = report.notes[0]
  assert note.startswith("does not fit")
  assert "Biggest consumers: " in note and "optimizer state" in note
  assert "lm_head/kernel" in note and "embed_tokens/embedding" in note
  assert "--remat full" in note and "--mode factored" in note
  # The params alone: (embedding + head) / chips, float32.
  n = 4 if HAS_LIBTPU else 8
  params = next(b["bytes"] for b in report.breakdown
                if b["name"].startswith("params"))
  assert params >= 2 * (1 << 22) * 8192 * 4 // n


@pytest.mark.parametrize("argv,match", [
    (["--model", "llama-9", "--topology", "local", "--mesh", "fsdp=8"],
     r"--model 'llama-9' is neither a preset.*llama-3\.1-8b"),
    (["--model", "smollm2-135m", "--topology", "v9z:2x2", "--mesh",
      "fsdp=4"], r"unknown TPU generation 'v9z'"),
    (["--model", "smollm2-135m", "--topology", "pod", "--mesh", "fsdp=4"],
     r"--topology 'pod' is not a TPU topology name"),
    (["--model", "smollm2-135m", "--topology", "local", "--mesh", "fsdp=4"],
     r"--mesh fsdp=4 has 4 devices but --topology local has 8 chips"),
    (["--model", "smollm2-135m", "--topology", "local", "--mesh",
      "fsdp=8,experts=1"], r"--mesh axis 'experts' is unknown"),
    (["--model", "smollm2-135m", "--topology", "local", "--mesh", "fsdp"],
     r"'fsdp' is not NAME=SIZE"),
])
def test_bad_flags_exit_2_with_one_paragraph(capsys, argv, match):
  code, out, err = run_cli(capsys, *argv, "--batch-size", 8, "--seq-len",
                           16)
  assert code == 2 and out == ""
  assert err.startswith("lorajax plan: error: ")
  assert err.strip().count("\n") == 0  # one paragraph
  assert re.search(match, err), err


def test_batch_not_divisible_and_tpu_mesh_mismatch(capsys):
  code, _, err = run_cli(capsys, "--model", "smollm2-135m", "--topology",
                         "local", "--mesh", "data=2,fsdp=4", "--batch-size",
                         6, "--seq-len", 16)
  assert code == 2 and "--batch-size 6 is not divisible by data x fsdp = 8"\
      in err
  if HAS_LIBTPU:
    code, _, err = run_cli(capsys, "--model", "llama-3.1-8b", "--topology",
                           "v5p:2x2x2", "--mesh", "fsdp=4", "--batch-size",
                           8, "--seq-len", 16)
    assert code == 2 and "has 8 chips" in err


def test_missing_libtpu_says_how_to_install(capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # import -> ImportError
  code, _, err = run_cli(capsys, "--model", "smollm2-135m", "--topology",
                         "v5e:2x2", "--mesh", "fsdp=4", "--batch-size", 8,
                         "--seq-len", 16)
  assert code == 2
  assert 'pip install "lorajax[tpu]"' in err


def test_collectives_parser_on_hlo_text():
  hlo = """\
HloModule m

%body.1 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = bf16[64,128]{1,0} all-gather(bf16[16,128]{1,0} %x), dimensions={0}
  %ar-start = (f32[8]{0}, f32[8]{0}) all-reduce-start(f32[8]{0} %y, %y2)
  %ag2 = (f32[2]{0}, f32[8]{0}) all-gather-start(f32[2]{0} %v), dimensions={0}
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond.1, body=%body.1, \
backend_config={"known_trip_count":{"n":"32"}}
  %rs = f32[2,4]{1,0} reduce-scatter(f32[8,4]{1,0} %z), dimensions={0}
  ROOT %cp = f32[8]{0} collective-permute(f32[8]{0} %q)
}
"""
  # A loop without a recorded trip count: the bound its condition uses.
  hlo += """
%cond.2 (p: (s32[], f32[8])) -> pred[] {
  %c = s32[]{:T(128)} constant(80)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body.2 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %a2a = f32[4,4]{1,0} all-to-all(f32[4,4]{1,0} %u), dimensions={0}
}

%other (a: f32[8]) -> f32[8] {
  %w2 = (s32[], f32[8]) while(%t2), condition=%cond.2, body=%body.2
}
"""
  got = {c["kind"]: c for c in plan_lib.collectives(hlo)}
  assert got["all-to-all"]["count"] == 80
  assert got["all-to-all"]["bytes"] == 80 * 16 * 4
  assert got["all-gather"]["count"] == 64
  assert got["all-gather"]["bytes"] == 32 * (64 * 128 * 2 + 8 * 4)
  # A combined all-reduce of two arrays; an async all-gather's result only.
  assert got["all-reduce"]["bytes"] == 32 * 2 * 8 * 4
  assert got["all-gather"]["static_count"] == 2
  assert got["reduce-scatter"]["bytes"] == 2 * 4 * 4
  assert got["collective-permute"]["count"] == 1
  assert got["collective-permute"]["static_count"] == 1


def test_python_m_lorajax_plan_help():
  import subprocess
  root = pathlib.Path(__file__).resolve().parent.parent
  r = subprocess.run([sys.executable, "-m", "lorajax", "plan", "--help"],
                     cwd=root, capture_output=True, text=True, timeout=120,
                     check=False)
  assert r.returncode == 0, r.stderr
  for opt in ("--model", "--topology", "--mesh", "--batch-size", "--seq-len",
              "--rank", "--mode", "--precision", "--remat", "--json"):
    assert opt in r.stdout
  for choice in ("factored", "merged", "full", "bf16", "f32", "dots"):
    assert choice in r.stdout


def test_activation_sharding_keeps_the_logits():
  """`llama.forward(..., activation_sharding=)` only pins a layout."""
  import jax
  import numpy as np
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  from lorajax._src.models import llama
  config = llama.LlamaConfig.from_hf_dict(TINY)
  params = llama.init_params(config, key=jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (8, 16), 0, 256)
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"),
                       axis_types=(AxisType.Auto,) * 2)
  act = NamedSharding(mesh, P(("data", "fsdp"), None, None))
  want = llama.forward(params, config, ids)
  got = jax.jit(lambda p, i: llama.forward(
      p, config, i, activation_sharding=act))(params, ids)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                             atol=1e-5)
