"""The core safetensors reader against safetensors' and torch's own reading,
and the light core install: `import lorajax` pulls no application stack."""

import json
import os
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as st_load_numpy
from safetensors.numpy import save_file as st_save_numpy
from safetensors.torch import save_file as st_save_torch

from lorajax._src.core import safetensors_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_f32_f16_int_match_safetensors_numpy(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
      "w32": rng.normal(size=(5, 7)).astype(np.float32),
      "w16": rng.normal(size=(3, 2, 4)).astype(np.float16),
      "ids": rng.integers(-9, 9, size=(6,)).astype(np.int64),
      "scalar": np.asarray(1.5, np.float32),
      "empty": np.zeros((0, 3), np.float32),
  }
  path = tmp_path / "x.safetensors"
  st_save_numpy(tensors, str(path), metadata={"format": "np"})
  want = st_load_numpy(str(path))
  got = safetensors_io.load_file(path)
  assert set(got) == set(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
    np.testing.assert_array_equal(got[k], want[k])
  with safetensors_io.SafetensorsFile(path) as f:
    assert f.metadata == {"format": "np"}
    assert not f["w32"].flags.writeable  # a view of the file, not a copy


def test_bf16_and_fp8_match_torch(tmp_path):
  g = torch.Generator().manual_seed(0)
  t = {"bf": torch.randn(4, 6, generator=g).to(torch.bfloat16),
       "f8": torch.randn(8, generator=g).to(torch.float8_e4m3fn)}
  path = tmp_path / "bf.safetensors"
  st_save_torch(t, str(path))
  with safetensors_io.SafetensorsFile(path) as f:
    bf, f8 = f["bf"], f["f8"]
  assert bf.dtype == ml_dtypes.bfloat16 and bf.shape == (4, 6)
  # Widening to float32 is exact on both sides.
  np.testing.assert_array_equal(bf.astype(np.float32),
                                t["bf"].float().numpy())
  np.testing.assert_array_equal(f8.astype(np.float32),
                                t["f8"].float().numpy())


def _raw(header: dict, data: bytes) -> bytes:
  h = json.dumps(header).encode()
  return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("content,match", [
    (b"\x01\x02", r"shorter than the 8-byte header length"),
    (struct.pack("<Q", 10**6) + b"{}", r"declares a 1000000-byte header"),
    (struct.pack("<Q", 3) + b"{x}", r"header that is not JSON"),
    (_raw({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
          b"\0" * 8), r"'w' \(F32\[4\], 16 bytes\) has data offsets"),
    (_raw({"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}},
          b"\0"), r"'w' has an unknown dtype"),
], ids=["short", "header-too-long", "not-json", "truncated", "dtype"])
def test_bad_files_name_the_file_and_tensor(tmp_path, content, match):
  path = tmp_path / "bad.safetensors"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=rf"bad\.safetensors: not a valid"
                     rf" safetensors file: it .*{match}"):
    safetensors_io.SafetensorsFile(path)


HEAVY = ("flax", "matplotlib", "tqdm", "gguf", "tokenizers", "jinja2",
         "torch", "transformers")


def test_core_import_and_peft_load_stay_light(tmp_path):
  """A bare `import lorajax` (and reading a bfloat16 PEFT adapter) loads
  none of the models/app dependencies, in a fresh interpreter."""
  d = tmp_path / "ad"
  d.mkdir()
  g = torch.Generator().manual_seed(1)
  st_save_torch({
      "base_model.model.layer.q.lora_A.weight":
          torch.randn(2, 6, generator=g).to(torch.bfloat16),
      "base_model.model.layer.q.lora_B.weight":
          torch.randn(4, 2, generator=g).to(torch.bfloat16),
  }, str(d / "adapter_model.safetensors"))
  (d / "adapter_config.json").write_text(json.dumps(
      {"peft_type": "LORA", "r": 2, "lora_alpha": 4,
       "target_modules": ["q"]}))
  code = f"""
import sys
import numpy as np
import lorajax, lorajax.peft
params = {{"layer": {{"q": {{"kernel": np.zeros((6, 4), np.float32)}}}}}}
ad = lorajax.peft.load({str(d)!r}, params)
node = ad["layer"]["q"]["kernel"]
assert node.a.shape == (6, 2) and node.scale == 2.0, node
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print("HEAVY", heavy)
"""
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=120, env=env, cwd=tmp_path,
                       check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "HEAVY []" in out.stdout, out.stdout


def test_models_import_without_the_application_stack():
  code = ("import sys, lorajax.models.llama\n"
          "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0]"
          " in ('flax', 'matplotlib', 'tqdm', 'torch')))")
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=120, env=env, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "HEAVY []" in out.stdout, out.stdout
