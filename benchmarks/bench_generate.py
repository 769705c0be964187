"""Batched generation throughput: lorajax vs transformers on SmolLM2-135M.

Greedy decoding of `--new` tokens after a chat prompt, at batch 1, 8 and 32,
with `lorajax.models.llama` (`LlamaModel.generate`: jitted prefill plus a
`lax.while_loop` decode over a preallocated KV cache, no host round trip
per token) and with `transformers`' `generate` on the same GGUF file
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, dequantized to
float32, KV cache on), on the same CPU. Stopping at EOS is off on both sides
so every row decodes exactly `--new` tokens. Both run on `--threads`
threads (default 1: on a shared, oversubscribed machine multi-threaded
runtimes spin and wait on each other; with one thread each, process CPU
time is the work done). XLA gets `--xla_cpu_multi_thread_eigen=false` for
one thread; torch `torch.set_num_threads`.

Timing: after one warm-up call per variant (lorajax's compile time is
reported separately), `--reps` rounds run every variant once each
(round-robin, so a load change hits all alike); medians of wall time.
tokens/s = batch x new tokens / wall time (prompt prefill included);
tokens per CPU second likewise with process CPU time.
Also reports whether the greedy tokens of the two agree at batch 1.

A third variant, `lorajax+adapter sampled`, samples at temperature 1 from
the base params with an unmerged rank-`--adapter-rank` LoRA adapter on all
linear layers (`generate(..., adapter=adapter)`: the adapter runs factored
inside the decode, as an RL loop samples from its current policy; its B is
random, not zero, though the cost does not depend on the values).

Emits one JSON line per (implementation, batch) on stdout, with the load
average at the start and the end of the run; `--smoke` runs batch 1 with 2
new tokens on a tiny random Llama checkpoint (written to a temporary
directory and loaded by both sides) instead of SmolLM2.
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser()
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--new", type=int, default=32)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--threads", type=int, default=1)
  p.add_argument("--adapter-rank", type=int, default=16)
  p.add_argument("--impls", default="lorajax,lorajax+adapter sampled,"
                 "transformers", help="comma-separated subset to run")
  return p.parse_args()


def _tiny_checkpoint(directory: str) -> str:
  """A random 2-layer Llama saved with transformers (the smoke model)."""
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=512, hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
      pad_token_id=0, tie_word_embeddings=True)
  transformers.LlamaForCausalLM(cfg).save_pretrained(directory)
  return directory


def main() -> None:
  args = _parse()
  if args.threads == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false")
  sys.path.insert(0, str(ROOT))
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers

  import lorajax
  from lorajax.models import llama

  torch.set_num_threads(args.threads)
  batches = [1] if args.smoke else [int(b) for b in args.batches.split(",")]
  new = 2 if args.smoke else args.new
  reps = 1 if args.smoke else args.reps

  load_start = list(os.getloadavg())
  if args.smoke:
    tmp = tempfile.mkdtemp()
    model, params = llama.from_pretrained(_tiny_checkpoint(tmp))
    ids = list(range(3, 41))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp, torch_dtype=torch.float32)
  else:
    path = pathlib.Path(llama.default_model_path())
    model, params = llama.from_pretrained(path)
    tok = model.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Write a short poem about the sea."}],
        add_generation_prompt=True)
    ids = tok.encode(prompt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
  hf.eval()
  adapter = lorajax.init(
      params, lorajax.LoraConfig(rank=args.adapter_rank, alpha=32.0,
                                 targets="all-linear"),
      key=jax.random.key(0))
  adapter = jax.tree.map(  # A non-zero B, as after some training.
      lambda x: x + 0.01 * jnp.ones_like(x), adapter)

  def run_lorajax(b):
    x = jnp.asarray([ids] * b, jnp.int32)
    out = model.generate(params, x, new, eos_id=[])
    return np.asarray(jax.block_until_ready(out))

  def run_adapter(b):
    x = jnp.asarray([ids] * b, jnp.int32)
    out = model.generate(params, x, new, eos_id=[], temperature=1.0,
                         key=jax.random.key(b), adapter=adapter)
    return np.asarray(jax.block_until_ready(out))

  def run_hf(b):
    x = torch.tensor([ids] * b)
    with torch.no_grad():
      out = hf.generate(x, attention_mask=torch.ones_like(x),
                        max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, use_cache=True,
                        pad_token_id=2, eos_token_id=None)
    return out[:, len(ids):].numpy()

  fns = {"lorajax": run_lorajax, "lorajax+adapter sampled": run_adapter,
         "transformers": run_hf}
  fns = {k: fns[k] for k in args.impls.split(",")}
  variants = {}
  for b in batches:
    for impl, fn in fns.items():
      t0 = time.perf_counter()
      first = fn(b)
      variants[(impl, b)] = {"first_call_s": time.perf_counter() - t0,
                             "times": [], "cpu": [], "tokens": first}
  for _ in range(reps):
    for (impl, b), v in variants.items():
      t0, c0 = time.perf_counter(), time.process_time()
      fns[impl](b)
      v["times"].append(time.perf_counter() - t0)
      v["cpu"].append(time.process_time() - c0)
  agree = None
  if "lorajax" in fns and "transformers" in fns:
    agree = float(np.mean(
        variants[("lorajax", batches[0])]["tokens"][0]
        == variants[("transformers", batches[0])]["tokens"][0]))
  env = {"jax": jax.__version__, "torch": torch.__version__,
         "transformers": transformers.__version__, "threads": args.threads,
         "cpu_count": os.cpu_count(), "loadavg_start": load_start,
         "loadavg": list(os.getloadavg()),
         "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  for (impl, b), v in variants.items():
    wall = statistics.median(v["times"])
    cpu = statistics.median(v["cpu"])
    print(json.dumps({
        "bench": "generate", "impl": impl, "batch": b, "prompt_tokens":
        len(ids), "new_tokens": new, "median_s": round(wall, 4),
        "tokens_per_s": round(b * new / wall, 2), "cpu_s": round(cpu, 4),
        "tokens_per_cpu_s": round(b * new / cpu, 2),
        "first_call_s": round(v["first_call_s"], 2),
        "times_s": [round(t, 4) for t in v["times"]],
        "greedy_agreement_batch1": agree, "smoke": args.smoke,
        "adapter_rank": args.adapter_rank if "adapter" in impl else None,
        **env}),
        flush=True)


if __name__ == "__main__":
  main()
