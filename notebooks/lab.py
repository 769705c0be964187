"""Shared experiment code for the lorajax reproduction notebooks.

Everything the notebooks share lives here: the offline corpora and a byte
tokenizer, the tiny Llama-family model (pretrained by `pretrain_tiny.py`), a
vmapped trainer that runs many (learning rate, seed) configurations of full
fine-tuning or LoRA in one compiled program, results I/O and verdict helpers.
Only lorajax's public API is used (`lorajax.init`, `lorajax.merge`,
`lorajax.LoraConfig`, `lorajax.lora`, `lorajax.summary`,
`lorajax.models.llama`).

`LORAJAX_SMOKE=1` shrinks every sweep (`pick(full, smoke)`) and stops the
notebooks from overwriting the committed full-size results.
"""

import json
import os
import pathlib
import sysconfig
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax
from lorajax.models import llama

SMOKE = os.environ.get("LORAJAX_SMOKE", "") not in ("", "0")
HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
PRETRAINED = RESULTS / "tiny_pretrained.safetensors"
PRETRAINED_INFO = RESULTS / "tiny_pretrained.json"


def pick(full: Any, smoke: Any) -> Any:
  """`smoke` under LORAJAX_SMOKE=1, else `full`."""
  return smoke if SMOKE else full


# ----------------------------------------------------------------------------
# Data: byte tokenizer, offline corpora.

VOCAB = 256


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes as int32 token ids (vocabulary of 256)."""
  return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(ids: Sequence[int]) -> str:
  """Token ids back to text (invalid UTF-8 replaced)."""
  return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def pretrain_text() -> str:
  """The Python documentation topics shipped with CPython (`pydoc_data`)."""
  from pydoc_data.topics import topics
  return "\n\n".join(topics[k] for k in sorted(topics))


FINETUNE_MODULES = ("textwrap", "heapq", "fractions", "statistics", "shlex",
                    "string", "glob", "fnmatch", "colorsys", "bisect")


def finetune_text() -> str:
  """A domain shift from the prose: Python source of ten stdlib modules."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  return "\n\n".join((root / f"{m}.py").read_text() for m in FINETUNE_MODULES)


def finetune_split(eval_frac: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """(train, eval) token arrays of the fine-tuning corpus (eval = the tail)."""
  ids = encode(finetune_text())
  cut = int(len(ids) * (1 - eval_frac))
  return ids[:cut], ids[cut:]


def lm_windows(tokens: np.ndarray, n: int, seq: int, seed: int) -> np.ndarray:
  """`n` random windows of `seq + 1` tokens, (n, seq + 1) int32."""
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(tokens) - seq - 1, size=n)
  return np.stack([tokens[s:s + seq + 1] for s in starts]).astype(np.int32)


def lm_batches(tokens: np.ndarray, *, steps: int, batch: int, seq: int,
               seed: int) -> np.ndarray:
  """Training batches (steps, batch, seq + 1) drawn with `seed`."""
  return lm_windows(tokens, steps * batch, seq, seed).reshape(
      steps, batch, seq + 1)


# ----------------------------------------------------------------------------
# Model.


def tiny_config(width: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, ffn: int | None = None,
                max_len: int = 256) -> llama.LlamaConfig:
  """A small byte-level Llama (tied embeddings, GQA, SwiGLU MLP)."""
  return llama.LlamaConfig(
      vocab_size=VOCAB, hidden_size=width, intermediate_size=ffn or 4 * width,
      num_hidden_layers=layers, num_attention_heads=heads,
      num_key_value_heads=kv_heads, max_position_embeddings=max_len,
      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
      rms_norm_eps=1e-5)


def pretrained() -> tuple[llama.LlamaModel, Any, dict]:
  """The tiny model pretrained by `pretrain_tiny.py` (run it if missing)."""
  if not PRETRAINED.exists():
    import pretrain_tiny
    pretrain_tiny.main()
  from safetensors.numpy import load_file
  info = json.loads(PRETRAINED_INFO.read_text())
  config = tiny_config(**info["config"])
  flat = load_file(str(PRETRAINED))
  params: dict = {}
  for key, value in flat.items():
    node = params
    parts = key.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = jnp.asarray(value)
  return llama.LlamaModel(config), params, info


def flatten(params: Any) -> dict[str, np.ndarray]:
  """{"a/b/c": array} view of a params tree (the safetensors layout)."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
          for k, v in leaves}


def token_nll(model: llama.LlamaModel, params: Any,
              tokens: jax.Array) -> jax.Array:
  """Per-position next-token negative log-likelihood (nats), (batch, seq)."""
  logits = model.apply(params, tokens[:, :-1])
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def lm_loss(model: llama.LlamaModel, params: Any, tokens: jax.Array,
            mask: jax.Array | None = None) -> jax.Array:
  """Mean next-token loss (nats), over `mask` (batch, seq) when given."""
  nll = token_nll(model, params, tokens)
  if mask is None:
    return nll.mean()
  return (nll * mask).sum() / jnp.maximum(mask.sum(), 1)


def n_adapter_params(params: Any, config: lorajax.LoraConfig) -> int:
  """Number of trainable adapter parameters (`a` and `b`) for `config`."""
  adapter = jax.eval_shape(lambda: lorajax.init(params, config,
                                                key=jax.random.key(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapter))


def n_params(params: Any) -> int:
  """Number of parameters in a tree."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------
# The vmapped trainer.


def _stack(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def train(base: Any, objective: Callable, data: Any, *, method: str,
          lrs: Sequence[float], seeds: Sequence[int],
          lora_config: lorajax.LoraConfig | None = None,
          eval_fn: Callable | None = None, eval_every: int = 0,
          b1: float = 0.9, b2: float = 0.999) -> dict:
  """Trains len(lrs) configurations side by side with Adam at constant LR.

  Args:
    base: The frozen base params.
    objective: `objective(params, batch, key) -> (loss, metrics)`; it sees the
      effective params (`params` for full fine-tuning, `merge(base, adapter)`
      for LoRA) and one step's batch.
    data: Pytree of arrays with leading axes (n_configs, steps, ...).
    method: "full" or "lora".
    lrs: Learning rate of each configuration.
    seeds: Seed of each configuration (LoRA init of `a`, sampling keys).
    lora_config: The adapter config for method="lora".
    eval_fn: Optional `eval_fn(params) -> dict of scalars`.
    eval_every: Evaluate every this many steps (and at step 0 and the end).
    b1: Adam beta1.
    b2: Adam beta2.

  Returns:
    Dict of numpy arrays: "loss" and each objective metric (n, steps),
    "eval_steps", "eval_<metric>" (n, n_evals), "seconds" (wall time) and
    "final" (the trained params or adapters, stacked over configurations).
  """
  n = len(lrs)
  if len(seeds) != n:
    raise ValueError(f"`seeds` ({len(seeds)}) and `lrs` ({n}) differ in length.")
  steps = jax.tree.leaves(data)[0].shape[1]
  if method == "full":
    # Full fine-tuning: the train step's trainable argument is the params.
    tr = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), base)
    frozen = None

    def effective(t):
      return t
  elif method == "lora":
    if lora_config is None:
      raise ValueError("method='lora' needs a `lora_config`.")
    tr = _stack([lorajax.init(base, lora_config, key=jax.random.key(s))
                 for s in seeds])
    frozen = base

    def effective(t):
      return lorajax.merge(base, t)
  else:
    raise ValueError(f"`method` must be 'full' or 'lora'; got {method!r}.")

  def loss_fn(p, t, batch):
    data, key = batch
    return objective(t if p is None else lorajax.merge(p, t), data, key)

  # Adam with the learning rate in the optimizer state, so that every
  # configuration (vmapped) has its own.
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=1.0, b1=b1, b2=b2)
  ts = lorajax.make_train_step(loss_fn, tx, has_aux=True)
  state = jax.vmap(ts.init)(tr)
  state = state._replace(hyperparams={
      **state.hyperparams, "learning_rate": jnp.asarray(lrs, jnp.float32)})
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32) + 1000)

  def one_step(carry, batch):
    t, s, key = carry
    key, sub = jax.random.split(key)
    t, s, m = ts.step(frozen, t, s, (batch, sub))
    return (t, s, key), {"loss": m["loss"], **m["aux"]}

  @jax.jit
  def chunk(t, s, key, batches):
    def per_config(t, s, key, batches):
      (t, s, key), logs = jax.lax.scan(one_step, (t, s, key), batches)
      return t, s, key, logs
    return jax.vmap(per_config)(t, s, key, batches)

  ev = jax.jit(jax.vmap(lambda t: eval_fn(effective(t)))) if eval_fn else None
  every = eval_every or steps
  logs, evals, eval_steps = [], [], []
  t0 = time.perf_counter()
  if ev:
    evals.append(jax.device_get(ev(tr)))
    eval_steps.append(0)
  done = 0
  while done < steps:
    k = min(every, steps - done)
    batch = jax.tree.map(lambda x: x[:, done:done + k], data)
    tr, state, keys, log = chunk(tr, state, keys, batch)
    logs.append(jax.device_get(log))
    done += k
    if ev:
      evals.append(jax.device_get(ev(tr)))
      eval_steps.append(done)
  out = {k: np.concatenate([l[k] for l in logs], axis=1) for k in logs[0]}
  if ev:
    out["eval_steps"] = np.asarray(eval_steps)
    for k in evals[0]:
      out["eval_" + k] = np.stack([e[k] for e in evals], axis=1)
  out["seconds"] = time.perf_counter() - t0
  out["final"] = tr
  return out


# ----------------------------------------------------------------------------
# Fine-tuning task shared by several notebooks.


def lm_task(model: llama.LlamaModel, *, steps: int, batch: int, seq: int,
            seeds: Sequence[int], n_eval: int = 64):
  """(objective, eval_fn, data_for(seed_list)) for the stdlib-source fine-tune."""
  train_ids, eval_ids = finetune_split()
  eval_batch = jnp.asarray(lm_windows(eval_ids, n_eval, seq, seed=12345))

  def objective(params, tokens, key):
    del key
    return lm_loss(model, params, tokens), {}

  def eval_fn(params):
    return {"loss": lm_loss(model, params, eval_batch)}

  cache = {s: lm_batches(train_ids, steps=steps, batch=batch, seq=seq, seed=s)
           for s in set(seeds)}

  def data_for(seed_list):
    return jnp.asarray(np.stack([cache[s] for s in seed_list]))

  return objective, eval_fn, data_for


# ----------------------------------------------------------------------------
# Analysis and I/O.


def log_parabola_min(lrs: Sequence[float], losses: Sequence[float]) -> float:
  """Optimal LR: vertex of a parabola in log10(lr) through the best 3 points.

  Non-finite losses count as +inf. Falls back to the best grid point when the
  minimum sits on the grid's edge or the parabola opens downward.
  """
  x = np.log10(np.asarray(lrs, float))
  y = np.where(np.isfinite(losses), np.asarray(losses, float), np.inf)
  i = int(np.argmin(y))
  if i == 0 or i == len(x) - 1 or not np.all(np.isfinite(y[i - 1:i + 2])):
    return float(10 ** x[i])
  a, b, _ = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
  if a <= 0:
    return float(10 ** x[i])
  return float(10 ** np.clip(-b / (2 * a), x[i - 1], x[i + 1]))


def save_json(name: str, obj: Any) -> pathlib.Path | None:
  """Writes results/<name>.json (atomically); skipped in smoke mode."""
  if SMOKE:
    return None
  RESULTS.mkdir(exist_ok=True)
  path = RESULTS / f"{name}.json"
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(_plain(obj), indent=1, sort_keys=True) + "\n")
  tmp.replace(path)
  return path


def save_fig(fig: Any, name: str) -> None:
  """Saves results/<name>.png; skipped in smoke mode."""
  if SMOKE:
    return
  RESULTS.mkdir(exist_ok=True)
  tmp = RESULTS / f".{name}.tmp.png"
  fig.savefig(tmp, dpi=110, bbox_inches="tight")
  tmp.replace(RESULTS / f"{name}.png")


def show(fig: Any, name: str) -> None:
  """Saves the figure (`save_fig`), displays it inline as PNG and closes it.

  Works under any matplotlib backend (CI sets MPLBACKEND=Agg).
  """
  import io

  import matplotlib.pyplot as plt
  from IPython.display import Image, display
  save_fig(fig, name)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
  plt.close(fig)
  display(Image(data=buf.getvalue()))


def load_json(name: str) -> dict | None:
  """results/<name>.json, or None if it does not exist."""
  path = RESULTS / f"{name}.json"
  return json.loads(path.read_text()) if path.exists() else None


def _plain(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): _plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_plain(v) for v in obj]
  if isinstance(obj, (np.ndarray, jax.Array)):
    return _plain(np.asarray(obj).tolist())
  if isinstance(obj, (np.floating, float)):
    v = float(obj)
    return v if np.isfinite(v) else None
  if isinstance(obj, np.integer):
    return int(obj)
  return obj


def environment() -> dict:
  """What the numbers were measured on."""
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "cpu_count": os.cpu_count(), "smoke": SMOKE,
          "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def verdict(name: str, status: str, detail: str) -> str:
  """Formats and prints the one-line verdict (status: reproduced/partly/not)."""
  if status not in ("reproduced", "partly reproduced", "not reproduced"):
    raise ValueError(f"unknown verdict status {status!r}")
  line = f"VERDICT ({name}): {status.upper()} - {detail}"
  if SMOKE:
    line += " [smoke mode: tiny sweep, not the committed result]"
  print(line)
  return line


# ----------------------------------------------------------------------------
# Synthetic memorisation task with a known information content.

KEY_LETTERS = "abcdefghijklmnop"  # 16 letters: 4 bits per character


def memorisation_task(model: llama.LlamaModel, *, n_pairs: int, key_len: int = 4,
                      value_len: int = 3, seed: int = 0):
  """Random key -> value pairs, each line `key:value\\n`.

  Values are uniform over 16 letters and independent of everything, so the
  table holds exactly `n_pairs * value_len * 4` bits that cannot be inferred;
  a model that only learned the format (a letter of the 16) pays 4 bits per
  value character. Loss is taken on the value characters only.

  Returns:
    (objective, eval_fn, pairs, info_bits). The objective's batch is an int
    array of pair indices; eval_fn returns the memorised bits over all pairs:
    `info_bits - total cross-entropy in bits`.
  """
  rng = np.random.default_rng(seed)
  keys: set[str] = set()
  while len(keys) < n_pairs:
    keys.add("".join(rng.choice(list(KEY_LETTERS), key_len)))
  lines = [k + ":" + "".join(rng.choice(list(KEY_LETTERS), value_len)) + "\n"
           for k in sorted(keys)]
  rng.shuffle(lines)
  tokens = jnp.asarray(np.stack([encode(l) for l in lines]))
  mask = np.zeros((n_pairs, tokens.shape[1] - 1), np.float32)
  mask[:, key_len + 1:key_len + 1 + value_len] = 1.0  # predict value chars
  mask = jnp.asarray(mask)
  info_bits = n_pairs * value_len * 4.0

  def objective(params, idx, key):
    del key
    return lm_loss(model, params, tokens[idx], mask[idx]), {}

  def eval_fn(params):
    nll = token_nll(model, params, tokens)
    total_bits = (nll * mask).sum() / np.log(2.0)
    return {"memorised_bits": info_bits - total_bits,
            "value_loss": (nll * mask).sum() / mask.sum()}

  return objective, eval_fn, lines, info_bits


def index_batches(n_items: int, *, steps: int, batch: int, seed: int) -> np.ndarray:
  """(steps, batch) item indices: shuffled epochs, drawn with `seed`."""
  rng = np.random.default_rng(seed)
  out = []
  while len(out) * n_items < steps * batch:
    out.append(rng.permutation(n_items))
  return np.concatenate(out)[:steps * batch].reshape(steps, batch).astype(np.int32)


# ----------------------------------------------------------------------------
# Reinforcement learning: single-digit addition with an exact reward.


def addition_task(model: llama.LlamaModel, *, group: int):
  """Policy gradient on `a + b = ` -> the digit `a+b` (all 55 pairs with a+b<=9).

  The objective's batch holds prompt indices; each prompt is repeated
  `group` times. The policy samples one byte after the prompt; reward 1 if it is the right
  digit, else 0. The advantage is the reward minus the mean reward of the
  `group` samples drawn for the same prompt (group-mean baseline), and the
  loss is `-mean(advantage * log p(sample))`.

  Returns:
    (objective, eval_fn, n_prompts). The objective's batch is an int array of
    prompt indices; eval_fn gives the mean probability of the right digit
    ("p_correct") and greedy accuracy ("accuracy") over all 55 prompts.
  """
  pairs = [(a, b) for a in range(10) for b in range(10) if a + b <= 9]
  prompts = jnp.asarray(np.stack([encode(f"{a} + {b} = ") for a, b in pairs]))
  answers = jnp.asarray(encode("".join(str(a + b) for a, b in pairs)))

  def last_logp(params, ids):
    return jax.nn.log_softmax(model.apply(params, ids)[:, -1], axis=-1)

  def objective(params, idx, key):
    ids = jnp.repeat(prompts[idx], group, axis=0)
    logp = last_logp(params, ids)
    sample = jax.random.categorical(key, jax.lax.stop_gradient(logp))
    reward = (sample == jnp.repeat(answers[idx], group)).astype(jnp.float32)
    r = reward.reshape(-1, group)
    adv = (r - r.mean(axis=1, keepdims=True)).reshape(-1)
    lp = jnp.take_along_axis(logp, sample[:, None], axis=-1)[:, 0]
    return -(adv * lp).mean(), {"reward": reward.mean()}

  def eval_fn(params):
    logp = last_logp(params, prompts)
    right = jnp.take_along_axis(logp, answers[:, None], axis=-1)[:, 0]
    return {"p_correct": jnp.exp(right).mean(),
            "accuracy": (logp.argmax(-1) == answers).mean()}

  return objective, eval_fn, len(pairs)


# ----------------------------------------------------------------------------
# Timing.


def time_fn(fn: Callable, *args: Any, reps: int = 7) -> dict:
  """Compile time and the median/min steady-state time of `jax.jit(fn)`."""
  jitted = jax.jit(fn)
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return {"compile_s": compile_s, "median_s": float(np.median(times)),
          "min_s": float(np.min(times)), "reps": reps}


def time_compare(fns: dict[str, Callable], *args: Any, reps: int = 7) -> dict:
  """Times several functions of the same arguments, interleaved.

  Each is compiled (`jax.jit`) and warmed up; then each of `reps` rounds
  runs every function once. Wall time and process CPU time are recorded per
  call, so a load change on a shared machine hits all functions alike.
  Run with single-threaded XLA for CPU time to equal the work done.

  Returns:
    {name: {"compile_s", "wall_s" (median), "cpu_s" (median), "cpu": list}}.
  """
  compiled = {}
  out = {}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    compiled[name] = jax.jit(fn).lower(*args).compile()
    out[name] = {"compile_s": time.perf_counter() - t0, "wall": [], "cpu": []}
    jax.block_until_ready(compiled[name](*args))
  for _ in range(reps):
    for name, c in compiled.items():
      w0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(c(*args))
      out[name]["wall"].append(time.perf_counter() - w0)
      out[name]["cpu"].append(time.process_time() - c0)
  for v in out.values():
    v["wall_s"] = float(np.median(v["wall"]))
    v["cpu_s"] = float(np.median(v["cpu"]))
  return out
