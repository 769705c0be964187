"""Checkpoint size and save time of adapter-only orbax checkpoints.

Shapes of SmolLM2-135M (30 llama blocks, d_model 576, FFN 1536, 9 heads of
64, 3 KV heads, vocab 49152, tied embeddings); the base weights are only
shapes here (their size is computed, not written). Emits one JSON line per
configuration; `--smoke` runs rank 8 only.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lorajax  # noqa: E402

D, FF, LAYERS, VOCAB, HD, H, KV = 576, 1536, 30, 49152, 64, 9, 3


def smollm2_shapes() -> dict:
  f = lambda *s: jax.ShapeDtypeStruct(s, np.float32)  # noqa: E731
  layer = {
      "q_proj": {"kernel": f(D, H * HD)}, "k_proj": {"kernel": f(D, KV * HD)},
      "v_proj": {"kernel": f(D, KV * HD)}, "o_proj": {"kernel": f(H * HD, D)},
      "gate_proj": {"kernel": f(D, FF)}, "up_proj": {"kernel": f(D, FF)},
      "down_proj": {"kernel": f(FF, D)},
      "input_norm": {"scale": f(D)}, "post_norm": {"scale": f(D)},
  }
  return {"embed_tokens": {"embedding": f(VOCAB, D)},
          "layers": {str(i): layer for i in range(LAYERS)},
          "norm": {"scale": f(D)}}


def _randomize(tree):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.random.normal(k, x.shape, x.dtype) if x.dtype == np.float32 else x
      for x, k in zip(leaves, keys)])


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--smoke", action="store_true")
  args = parser.parse_args()
  params = smollm2_shapes()
  n_base = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  for rank in [8] if args.smoke else [8, 64]:
    config = lorajax.LoraConfig(rank=rank, alpha=32.0)
    adapter = _randomize(lorajax.init(params, config, key=jax.random.key(0)))
    # Random values stand in for a trained state (zeros would compress).
    opt_state = _randomize(optax.adamw(1e-4).init(adapter))
    n_adapter = sum(x.size for x in jax.tree.leaves(adapter))
    for with_opt in (False, True):
      with tempfile.TemporaryDirectory() as tmp:
        with lorajax.CheckpointManager(tmp, config) as mgr:
          t0 = time.perf_counter()
          mgr.save(1, adapter, opt_state if with_opt else None)
          t_return = time.perf_counter() - t0
          mgr.wait_until_finished()
          t_total = time.perf_counter() - t0
          size = mgr.nbytes(1)
      print(json.dumps({
          "bench": "checkpoint", "model": "SmolLM2-135M shapes",
          "jax": jax.__version__, "device_kind": jax.devices()[0].device_kind,
          "rank": rank, "targets": "all-linear", "dtype": "float32",
          "with_adam_state": with_opt, "base_params": n_base,
          "base_bytes_f32": 4 * n_base, "base_bytes_bf16": 2 * n_base,
          "adapter_params": n_adapter, "checkpoint_bytes": size,
          "checkpoint_over_base_f32": size / (4 * n_base),
          "save_returns_s": round(t_return, 4),
          "save_total_s": round(t_total, 4),
      }), flush=True)


if __name__ == "__main__":
  main()
