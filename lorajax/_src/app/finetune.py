"""LoRA fine-tuning of a causal language model: loss, train step, loop, eval.

The pieces, each usable on its own from JAX code:

- `TrainConfig`: the hyperparameters (LoRA config, optimizer, batching).
- `loss_sums(logits, batch)`: summed next-token loss on the completion tokens.
- `make_train_step(model, optimizer, mode=...)`: `lorajax.make_train_step`
  with this loss, over `(accum, batch, length)` microbatches.
- `train(...)`: the loop (progress, metrics callback, resumable state).
- `evaluate(...)` / `generate_answers(...)`: exact-match accuracy and loss on
  held-out examples.

The model is anything with `apply(params, input_ids, attention_mask) ->
logits` and `generate(params, input_ids, max_new_tokens, ...)`, e.g.
`lorajax.models.llama`.
"""

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorajax._src.app import data as data_lib
from lorajax._src.core import adapter as adapter_lib
from lorajax._src.core import factored as factored_lib
from lorajax._src.core import quant as quant_lib
from lorajax._src.core import train as train_lib
from lorajax._src.core.config import LoraConfig
from lorajax._src.core.typing import PyTree

MODES = ("auto", "factored", "merged")

# Default learning rate: 10x 5e-5, the usual full fine-tuning rate (the
# default of Hugging Face `transformers.Trainer`), because the optimal LoRA
# learning rate is about 10x the full fine-tuning one (Schulman et al. 2025,
# "LoRA Without Regret": fitted ratio 9.8 over 14 Llama/Qwen models, ~15x for
# runs under 100 steps), with a constant schedule and alpha = 32. On the
# bundled task 5e-4 also gave steadier held-out accuracy than 1e-3.
DEFAULT_LEARNING_RATE = 5e-4
"""The default constant AdamW learning rate of `lorajax finetune` (5e-4).

Ten times the usual full fine-tuning rate of 5e-5, since the LoRA optimum is
about 10x full fine-tuning's (Schulman et al. 2025, "LoRA Without Regret").
"""


def default_mode() -> str:
  """The default execution mode: `"auto"` (see `auto_merged`)."""
  return "auto"


def auto_merged(din: int, dout: int, rank: int, tokens: int) -> bool:
  """Whether `mode="auto"` merges a `(din, dout)` weight's rank-`rank`
  adapter (else it runs factored), for `tokens` tokens per microbatch.

  The rule compares what each mode adds to the frozen weight's forward and
  input-gradient matmuls, in multiply-adds per step: merged pays the dense
  weight gradient (`tokens * din * dout`) plus forming `W + s*a@b` and its
  gradient to `a`, `b` (`2 * rank * din * dout`); factored pays the thin
  factor matmuls (`x@a`, `(x@a)@b`, and their gradients: `3 * tokens * rank
  * (din + dout)`). Thin matmuls run at about the rate of wide ones on this
  project's CPU (docs/performance.md), so they are weighed alike.
  Factored wins for `rank < din * dout / (3 * (din + dout))` at any batch
  (rank < 96 for 576 x 576), so LoRA as usually configured runs factored;
  merged wins for ranks near the width or very few tokens.

  Args:
    din: Input width of the weight.
    dout: Output width of the weight.
    rank: The adapter's rank.
    tokens: Tokens (padded) per microbatch.

  Returns:
    True to merge, False to run factored.
  """
  merged = tokens * din * dout + 2 * rank * din * dout
  factored = 3 * tokens * rank * (din + dout)
  return merged < factored


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyperparameters of a LoRA fine-tuning run.

  Attributes:
    lora: Which weights get adapters, rank and alpha (default: all linear
      layers, rank 16, alpha 32).
    learning_rate: Constant AdamW learning rate (see
      `DEFAULT_LEARNING_RATE` for where the default comes from).
    weight_decay: AdamW weight decay on the adapter matrices.
    steps: Optimizer steps. Ignored when `epochs` is set.
    epochs: If set, train for this many passes over the data instead.
    batch_size: Examples per micro-batch.
    grad_accum: Micro-batches per optimizer step (gradients are summed over
      all completion tokens of the step, then averaged).
    seq_len: Longest padded length; `None` picks the smallest bucket that
      holds the longest example.
    mode: `"factored"` computes `x@W + s*(x@a)@b` without forming dense
      weights or their gradients (`lorajax.lora`); `"merged"` runs the model
      on `merge(params, adapter)`; `"auto"` decides per weight by
      `auto_merged` (factored for every weight of the default run). `None`
      picks `default_mode()` (auto).
    seed: Seed of the adapter initialisation and the data order.
    max_grad_norm: Clip the global gradient norm to this (0 disables).
  """

  lora: LoraConfig = LoraConfig(rank=16, alpha=32.0, targets="all-linear")
  learning_rate: float = DEFAULT_LEARNING_RATE
  weight_decay: float = 0.0
  steps: int = 60
  epochs: float | None = None
  batch_size: int = 8
  grad_accum: int = 1
  seq_len: int | None = None
  mode: str | None = None
  seed: int = 0
  max_grad_norm: float = 1.0

  def __post_init__(self):
    if not isinstance(self.lora, LoraConfig):
      raise TypeError(f"`lora` must be a LoraConfig; got {self.lora!r}.")
    for name in ("steps", "batch_size", "grad_accum"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"`{name}` must be an integer >= 1; got {v!r}.")
    if self.epochs is not None and not 0 < self.epochs < math.inf:
      raise ValueError(
          f"`epochs` must be a finite number > 0; got {self.epochs!r}.")
    if not 0 < self.learning_rate < math.inf:
      raise ValueError(
          "`learning_rate` must be a finite number > 0; got"
          f" {self.learning_rate!r}."
      )
    for name in ("weight_decay", "max_grad_norm"):
      v = getattr(self, name, None)
      if v is not None and not 0 <= v < math.inf:
        raise ValueError(
            f"`{name}` must be a finite number >= 0 (or None); got {v!r}.")
    if self.seq_len is not None and self.seq_len < 2:
      raise ValueError(f"`seq_len` must be >= 2; got {self.seq_len!r}.")
    if self.mode is not None and self.mode not in MODES:
      raise ValueError(f"`mode` must be one of {MODES}; got {self.mode!r}.")

  @property
  def resolved_mode(self) -> str:
    return self.mode or default_mode()

  def num_steps(self, num_examples: int) -> int:
    """Optimizer steps of the run for a dataset of `num_examples`."""
    if self.epochs is None:
      return self.steps
    return data_lib.steps_for_epochs(
        self.epochs, num_examples, self.batch_size * self.grad_accum
    )

  def optimizer(self) -> optax.GradientTransformation:
    """AdamW with a constant learning rate (and gradient clipping)."""
    tx = optax.adamw(self.learning_rate, weight_decay=self.weight_decay)
    if self.max_grad_norm:
      tx = optax.chain(optax.clip_by_global_norm(self.max_grad_norm), tx)
    return tx

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable form; `TrainConfig.from_dict` inverts it."""
    d = dataclasses.asdict(self)
    d["lora"] = self.lora.to_dict()
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
    """Inverse of `to_dict`."""
    d = dict(d)
    d["lora"] = LoraConfig.from_dict(d["lora"])
    return cls(**d)


class TrainState(NamedTuple):
  """What a run carries from step to step (and what a checkpoint holds).

  Attributes:
    adapter: The adapter pytree (`lorajax.init` output).
    opt_state: The optax state for the adapter.
    step: Optimizer steps taken so far.
  """

  adapter: PyTree
  opt_state: PyTree
  step: int


def init_state(
    params: PyTree, config: TrainConfig, *, key: jax.Array
) -> TrainState:
  """A fresh adapter for `params` and its optimizer state, at step 0.

  Args:
    params: The frozen base params.
    config: The run's config (LoRA config and optimizer).
    key: PRNG key for the adapter initialisation.

  Returns:
    The initial `TrainState`.
  """
  adapter = adapter_lib.init(params, config.lora, key=key)
  opt_state = config.optimizer().init(adapter)
  return TrainState(adapter, opt_state, 0)


def forward_fn(model: Any, mode: str) -> Callable[..., jax.Array]:
  """`f(params, adapter, input_ids, attention_mask) -> logits`.

  Args:
    model: Has `apply(params, input_ids, attention_mask) -> logits`.
    mode: `"factored"` (through `lorajax.lora`), `"merged"`, or `"auto"`
      (per weight, see `auto_merged`).

  Returns:
    The forward function of the adapted model.
  """
  if mode not in MODES:
    raise ValueError(f"`mode` must be one of {MODES}; got {mode!r}.")
  if mode == "auto":
    lora_auto = factored_lib.lora(model.apply)

    def auto(params, adapter, input_ids, attention_mask):
      params, adapter = _auto_split(params, adapter, input_ids.size)
      return lora_auto(params, adapter, input_ids, attention_mask)

    return auto
  if mode == "factored":
    lora_apply = factored_lib.lora(model.apply)

    def factored(params, adapter, input_ids, attention_mask):
      return lora_apply(params, adapter, input_ids, attention_mask)

    return factored

  def merged(params, adapter, input_ids, attention_mask):
    return model.apply(adapter_lib.merge(params, adapter), input_ids,
                       attention_mask)

  return merged


def _loss_fn(model: Any, mode: str) -> Callable[..., Any]:
  """`loss_fn(params, adapter, (ids, att, loss_mask)) -> (sum, count)`.

  Models with a fused `loss_sums(params, ids, att, loss_mask)` (e.g.
  `lorajax.models.llama.LlamaModel`: the head only where the loss is set)
  use it; others go through their logits and `loss_sums`.
  """
  fused = getattr(model, "loss_sums", None)
  if fused is None:
    forward = forward_fn(model, mode)

    def via_logits(params, adapter, batch):
      ids, att, lm = batch
      return loss_sums(forward(params, adapter, ids, att), ids, lm)

    return via_logits
  if mode not in MODES:
    raise ValueError(f"`mode` must be one of {MODES}; got {mode!r}.")
  if mode in ("auto", "factored"):
    lora_fused = factored_lib.lora(fused)

    def factored(params, adapter, batch):
      if mode == "auto":
        params, adapter = _auto_split(params, adapter, batch[0].size)
      return lora_fused(params, adapter, *batch)

    return factored

  def merged(params, adapter, batch):
    return fused(adapter_lib.merge(params, adapter), *batch)

  return merged


def _auto_split(params: PyTree, adapter: PyTree,
                tokens: int) -> tuple[PyTree, PyTree]:
  """`(params with the merged adapters folded in, the factored rest)`."""

  def merge_it(w: Any, node: Any) -> bool:
    if (not isinstance(node, adapter_lib.LoraWeight)
        or node.magnitude is not None or quant_lib.is_quantized(w)
        or node.axes not in ("io", "sio")):
      return False
    return auto_merged(node.a.shape[-2], node.b.shape[-1],
                       node.a.shape[-1], tokens)

  is_node = lambda x: x is None or adapter_lib.is_node(x)  # noqa: E731
  pick = jax.tree.map(
      lambda node, w: node is not None and merge_it(w, node), adapter,
      params, is_leaf=is_node)
  to_merge = jax.tree.map(lambda n, m: n if m else None, adapter, pick,
                          is_leaf=is_node)
  rest = jax.tree.map(lambda n, m: None if m else n, adapter, pick,
                      is_leaf=is_node)
  if not any(jax.tree.leaves(pick)):
    return params, adapter
  return adapter_lib.merge(params, to_merge), rest


def loss_sums(
    logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy over the completion tokens.

  Position `t` predicts token `t + 1`, which counts when
  `loss_mask[..., t + 1]` is set.

  Args:
    logits: `(batch, length, vocab)`.
    input_ids: `(batch, length)` int.
    loss_mask: `(batch, length)`: 1 on tokens to predict.

  Returns:
    `(sum of negative log-likelihoods, number of predicted tokens)`, both
    float32 scalars.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = input_ids[:, 1:]
  weights = loss_mask[:, 1:].astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((logz - picked) * weights), jnp.sum(weights)


def make_train_step(
    model: Any,
    optimizer: optax.GradientTransformation,
    *,
    mode: str | None = None,
    param_shardings: PyTree = None,
    adapter_shardings: PyTree = None,
    batch_sharding: PyTree = None,
    donate: bool = True,
) -> train_lib.TrainStep:
  """The fine-tuning step: `lorajax.make_train_step` with the LM loss.

  `step(params, adapter, opt_state, batch) -> (adapter, opt_state, metrics)`
  (the argument order of `lorajax.make_train_step`). `batch` is
  `(input_ids, attention_mask, loss_mask)`, each shaped `(accum, batch,
  length)` (see `data.Batcher.batch`); the summed completion-token loss and
  its gradient are accumulated over the `accum` microbatches (in float32)
  and divided by the step's number of completion tokens, so accumulation
  equals one big batch. Only the adapter is differentiated; `params` stays
  frozen. The adapter and optimizer state buffers are donated.

  Args:
    model: Has `apply(params, input_ids, attention_mask) -> logits`.
    optimizer: The optax optimizer for the adapter.
    mode: `"factored"`, `"merged"` (see `forward_fn`), or `None` for
      `TrainConfig`'s default (`default_mode()`: auto). Models with a
      `loss_sums(params, ids, att, loss_mask)` method (`LlamaModel`) are
      trained through it: the output head runs only on chunks of positions
      that carry a loss.
    param_shardings: See `lorajax.make_train_step`.
    adapter_shardings: See `lorajax.make_train_step`.
    batch_sharding: See `lorajax.make_train_step`.
    donate: Donate the adapter and optimizer state buffers.

  Returns:
    A `lorajax.TrainStep(init, step)`. `metrics` has `loss` (mean per
    completion token), `tokens` (completion tokens) and `grad_norm`.
  """
  loss_fn = _loss_fn(model, mode or default_mode())

  ts = train_lib.make_train_step(
      loss_fn, optimizer, weighted=True, microbatched=True,
      param_shardings=param_shardings, adapter_shardings=adapter_shardings,
      batch_sharding=batch_sharding, donate=donate,
  )

  def step(params, adapter, opt_state, batch):
    adapter, opt_state, m = ts.step(params, adapter, opt_state, batch)
    return adapter, opt_state, {"loss": m["loss"], "tokens": m["weight"],
                                "grad_norm": m["grad_norm"]}

  return train_lib.TrainStep(init=ts.init, step=step)


def _batch_arrays(batch: data_lib.Batch):
  return (jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask),
          jnp.asarray(batch.loss_mask))


StepCallback = Callable[[int, dict[str, float], TrainState], None]


def train(
    model: Any,
    params: PyTree,
    examples: Sequence[data_lib.Example],
    config: TrainConfig,
    *,
    state: TrainState | None = None,
    key: jax.Array | None = None,
    num_steps: int | None = None,
    on_step: StepCallback | None = None,
    progress: bool = True,
) -> TrainState:
  """Fine-tunes an adapter on `examples`; the whole loop in one call.

  The data order is a pure function of `config.seed` and the step number, so
  passing the `state` restored from a checkpoint continues exactly where the
  run stopped.

  Args:
    model: Has `apply(params, input_ids, attention_mask) -> logits`.
    params: The frozen base params.
    examples: Tokenized training examples (`load_dataset`).
    config: Hyperparameters.
    state: A state to continue from; if `None`, a fresh one from `key`.
    key: PRNG key for a fresh adapter (required when `state` is `None`).
    num_steps: Total steps to reach (default `config.num_steps(...)`).
    on_step: Called after every step with `(step, metrics, state)`; `step`
      counts completed steps, `metrics` holds Python floats: `loss`, `tokens`
      (completion tokens), `seq_tokens` (real tokens processed), `padded` (
      tokens incl. padding), `grad_norm`, `step_time` (seconds),
      `cpu_time` (CPU seconds of this process, all threads: independent
      of other load on the machine), `tokens_per_s`.
    progress: Show a tqdm progress bar with loss, tokens/s and ETA.

  Returns:
    The final `TrainState`.

  Raises:
    ValueError: If neither `state` nor `key` is given.
  """
  if state is None:
    if key is None:
      raise ValueError("Pass `key=` for a fresh adapter, or `state=`.")
    state = init_state(params, config, key=key)
  seq_len = config.seq_len or _auto_seq_len(examples)
  batcher = data_lib.Batcher(
      examples, batch_size=config.batch_size, seq_len=seq_len,
      grad_accum=config.grad_accum, seed=config.seed,
  )
  total = num_steps if num_steps is not None else config.num_steps(
      len(examples))
  step_fn = make_train_step(model, config.optimizer(),
                            mode=config.resolved_mode).step
  adapter, opt_state, step = state
  bar = None
  if progress and step < total:
    from tqdm.auto import tqdm  # noqa: PLC0415

    bar = tqdm(total=total, initial=step, desc="finetune", unit="step",
               dynamic_ncols=True)
  batch = batcher.batch(step) if step < total else None
  arrays = _batch_arrays(batch) if batch is not None else None
  try:
    while step < total:
      assert batch is not None
      t0 = time.perf_counter()
      c0 = time.process_time()
      adapter, opt_state, m = step_fn(params, adapter, opt_state, arrays)
      # The step runs asynchronously: assemble and transfer the next batch
      # before waiting for this step's metrics.
      nxt = batcher.batch(step + 1) if step + 1 < total else None
      nxt_arrays = _batch_arrays(nxt) if nxt is not None else None
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      dt = time.perf_counter() - t0
      cpu = time.process_time() - c0
      step += 1
      if not math.isfinite(m["loss"]):
        raise FloatingPointError(
            f"The loss became {m['loss']} at step {step}. Lower the learning"
            " rate (`TrainConfig.learning_rate`) or check the data."
        )
      m.update(seq_tokens=batch.num_tokens,
               padded=int(batch.input_ids.size), step_time=dt, cpu_time=cpu,
               tokens_per_s=batch.num_tokens / dt)
      if bar is not None:
        bar.set_postfix(loss=f"{m['loss']:.4f}",
                        tok_s=f"{m['tokens_per_s']:.0f}", refresh=False)
        bar.update(1)
      if on_step is not None:
        on_step(step, m, TrainState(adapter, opt_state, step))
      batch, arrays = nxt, nxt_arrays
  finally:
    if bar is not None:
      bar.close()
  return TrainState(adapter, opt_state, step)


def _auto_seq_len(examples: Sequence[data_lib.Example]) -> int:
  longest = max(len(ex) for ex in examples)
  return max(32, 1 << (longest - 1).bit_length())


def _bucket(n: int) -> int:
  """The smallest power of two >= max(n, 16): few shapes to compile."""
  return max(16, 1 << (n - 1).bit_length())


def prompt_ids(record: data_lib.Record, tokenizer: Any) -> list[int]:
  """Token ids of a record's prompt with the generation prompt appended."""
  text = tokenizer.apply_chat_template(
      record.prompt_messages, add_generation_prompt=True
  )
  return list(tokenizer.encode(text, add_special_tokens=False))


def generate_answers(
    model: Any,
    params: PyTree,
    adapter: PyTree | None,
    records: Sequence[data_lib.Record],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[str]:
  """Greedy answers to each record's prompt (chat template applied).

  Prompts are left-padded into batches of `batch_size` at a bucketed length,
  so decoding compiles for few shapes. The adapter is merged into the params
  once for decoding.

  Args:
    model: Has `generate` and `tokenizer`.
    params: The base params.
    adapter: An adapter for `params`, or `None` for the base model.
    records: The conversations whose final answer is to be produced.
    max_new_tokens: Most tokens to generate per answer.
    batch_size: Prompts per `generate` call.

  Returns:
    The decoded answers (special tokens dropped, whitespace stripped).
  """
  tok = model.tokenizer
  # Stop on every end token the model knows (Llama-3-style instruct models end
  # a turn with a token other than the tokenizer's eos).
  cfg = model.config
  stops = {*(getattr(cfg, "eos_token_ids", None) or ()),
           getattr(cfg, "eos_token_id", None), tok.eos_id} - {None}
  eos = tuple(sorted(int(s) for s in stops)) or None
  quantized = _has_quantized(params)
  if quantized:  # Decode on the quantized base: never a dense copy.
    gen = _factored_generate(model, max_new_tokens, eos)
    adapter = _no_adapter(params) if adapter is None else adapter
  else:
    run_params = params if adapter is None else _merge_jit(params, adapter)
  prompts = [prompt_ids(r, tok) for r in records]
  pad = tok.pad_id if tok.pad_id is not None else 0
  answers: list[str] = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    width = _bucket(max(map(len, chunk)))
    ids = np.full((batch_size, width), pad, np.int32)
    att = np.zeros((batch_size, width), np.int32)
    for i, p in enumerate(chunk):
      ids[i, width - len(p):] = p
      att[i, width - len(p):] = 1
    for i in range(len(chunk), batch_size):  # Filler rows repeat row 0.
      ids[i], att[i] = ids[0], att[0]
    if quantized:
      out = gen(params, adapter, jnp.asarray(ids), jnp.asarray(att))
    else:
      out = model.generate(run_params, jnp.asarray(ids), max_new_tokens,
                           temperature=0.0, attention_mask=jnp.asarray(att),
                           eos_id=eos)
    out = np.asarray(out)
    if out.shape[1] == width + max_new_tokens:
      out = out[:, width:]
    for out_row in out[:len(chunk)]:
      row = list(out_row)
      ends = [i for i, t in enumerate(row) if t in stops]
      if ends:
        row = row[:ends[0]]
      answers.append(tok.decode(row, skip_special_tokens=True).strip())
  return answers


class EvalResult(NamedTuple):
  """Held-out evaluation.

  Attributes:
    exact_match: Fraction of answers equal to the reference (stripped).
    loss: Mean completion-token loss (teacher forced), or NaN if not run.
    answers: The generated answers, in example order.
    references: The reference answers.
    prompts: The last user message of each example.
  """

  exact_match: float
  loss: float
  answers: list[str]
  references: list[str]
  prompts: list[str]


_merge_jit = jax.jit(adapter_lib.merge)


def _has_quantized(params: PyTree) -> bool:
  return any(quant_lib.is_quantized(x) for x in jax.tree.leaves(
      params, is_leaf=quant_lib.is_quantized))


def _no_adapter(params: PyTree) -> PyTree:
  return jax.tree.map(lambda _: None, params, is_leaf=quant_lib.is_quantized)


@functools.lru_cache(maxsize=16)
def _factored_generate(model: Any, max_new_tokens: int, eos: Any):
  """`model.generate` through `lorajax.lora`, jitted (quantized bases)."""
  def gen(params, input_ids, attention_mask):
    return model.generate(params, input_ids, max_new_tokens, temperature=0.0,
                          attention_mask=attention_mask, eos_id=eos)
  return jax.jit(factored_lib.lora(gen))


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums_factored(model, params, adapter, input_ids, attention_mask,
                        loss_mask):
  if hasattr(model, "loss_sums"):
    return factored_lib.lora(model.loss_sums)(params, adapter, input_ids,
                                              attention_mask, loss_mask)
  logits = factored_lib.lora(model.apply)(params, adapter, input_ids,
                                          attention_mask)
  return loss_sums(logits, input_ids, loss_mask)


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(model, params, input_ids, attention_mask, loss_mask):
  if hasattr(model, "loss_sums"):  # The head only where the loss is.
    return model.loss_sums(params, input_ids, attention_mask, loss_mask)
  logits = model.apply(params, input_ids, attention_mask)
  return loss_sums(logits, input_ids, loss_mask)


def eval_loss(
    model: Any,
    params: PyTree,
    adapter: PyTree | None,
    examples: Sequence[data_lib.Example],
    *,
    batch_size: int = 16,
) -> float:
  """Mean completion-token loss over `examples` (teacher forced).

  Args:
    model: Has `apply`.
    params: The base params.
    adapter: An adapter, or `None` for the base model.
    examples: Tokenized examples.
    batch_size: Examples per forward pass.

  Returns:
    The loss per completion token.
  """
  quantized = _has_quantized(params)
  if quantized:  # Evaluate on the quantized base: never a dense copy.
    adapter = _no_adapter(params) if adapter is None else adapter
  else:
    run_params = params if adapter is None else _merge_jit(params, adapter)

  order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
  s = n = 0.0
  for start in range(0, len(order), batch_size):
    exs = [examples[i] for i in order[start:start + batch_size]]
    width = _bucket(max(map(len, exs)))
    b = data_lib.pad_batch(exs, width, batch_size)
    if quantized:
      ds, dn = _eval_sums_factored(model, params, adapter, b.input_ids,
                                   b.attention_mask, b.loss_mask)
    else:
      ds, dn = _eval_sums(model, run_params, b.input_ids, b.attention_mask,
                          b.loss_mask)
    s += float(ds)
    n += float(dn)
  return s / max(n, 1.0)


def evaluate(
    model: Any,
    params: PyTree,
    adapter: PyTree | None,
    examples: Sequence[data_lib.Example],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    with_loss: bool = True,
) -> EvalResult:
  """Exact-match accuracy of greedy answers, and the teacher-forced loss.

  Args:
    model: Has `apply`, `generate` and `tokenizer`.
    params: The base params.
    adapter: An adapter, or `None` for the base model.
    examples: Tokenized held-out examples.
    max_new_tokens: Most tokens to generate per answer.
    batch_size: Examples per batch.
    with_loss: Also compute the loss (one forward pass per batch).

  Returns:
    An `EvalResult`.
  """
  records = [ex.record for ex in examples]
  answers = generate_answers(model, params, adapter, records,
                             max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
  refs = [r.answer.strip() for r in records]
  em = float(np.mean([a == r for a, r in zip(answers, refs)])) if refs else 0.
  loss = (eval_loss(model, params, adapter, examples, batch_size=batch_size)
          if with_loss else float("nan"))
  prompts = [r.prompt_messages[-1]["content"] if r.prompt_messages else ""
             for r in records]
  return EvalResult(em, loss, answers, refs, prompts)
