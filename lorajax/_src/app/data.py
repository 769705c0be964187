"""Fine-tuning data: JSONL reading, chat templating, loss masks, bucketing.

A training example is one conversation rendered with the model's chat
template and tokenized; `loss_mask[t]` is True where token `t` belongs to an
assistant turn (the completion), so only those tokens are predicted in the
loss. Batches are padded to one of a few bucket lengths, so the jitted train
step compiles once per bucket and padding stays small.
"""

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from lorajax._src.core import fileio


class Tokenizer(Protocol):
  """What the data pipeline needs from a tokenizer."""

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    ...

  def apply_chat_template(
      self, messages: list[dict[str, str]], add_generation_prompt: bool = True
  ) -> str:
    ...


class DataError(ValueError):
  """A data file is missing, unreadable or malformed (names file and line)."""


_ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Record:
  """One JSONL line, normalised to chat messages.

  Attributes:
    messages: The conversation; the last message is the assistant's answer.
    source: `"file:line"`, for error messages.
  """

  messages: tuple[tuple[str, str], ...]
  source: str

  @property
  def prompt_messages(self) -> list[dict[str, str]]:
    """Every message before the final assistant answer."""
    return [{"role": r, "content": c} for r, c in self.messages[:-1]]

  @property
  def answer(self) -> str:
    """The final assistant answer (the reference for exact match)."""
    return self.messages[-1][1]


@dataclasses.dataclass(frozen=True)
class Example:
  """A tokenized conversation.

  Attributes:
    input_ids: Token ids, int32, shape `(length,)`.
    loss_mask: Bool, shape `(length,)`: True on completion tokens, the tokens
      the model is trained to predict.
    record: The record it came from.
  """

  input_ids: np.ndarray
  loss_mask: np.ndarray
  record: Record

  def __len__(self) -> int:
    return len(self.input_ids)


@dataclasses.dataclass(frozen=True)
class Batch:
  """A padded batch (right padding).

  Attributes:
    input_ids: int32 `(..., batch, length)`; padding positions hold 0.
    attention_mask: int32 `(..., batch, length)`: 1 on real tokens.
    loss_mask: float32 `(..., batch, length)`: 1 on tokens to predict.
  """

  input_ids: np.ndarray
  attention_mask: np.ndarray
  loss_mask: np.ndarray

  @property
  def num_tokens(self) -> int:
    return int(self.attention_mask.sum())

  @property
  def num_target_tokens(self) -> int:
    return int(self.loss_mask.sum())


def _fail(source: str, what: str, fix: str) -> DataError:
  return DataError(f"{source}: {what} {fix}")


_FORMAT_HELP = (
    "Each line must be a JSON object with string fields `prompt` and"
    " `completion`, or a `messages` list of {\"role\": \"system\"|\"user\"|"
    "\"assistant\", \"content\": str} objects ending with an assistant"
    " message."
)


def _parse_record(obj: Any, source: str) -> Record:
  if not isinstance(obj, dict):
    raise _fail(source, f"expected a JSON object; got {type(obj).__name__}.",
                _FORMAT_HELP)
  if "messages" in obj:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
      raise _fail(source, "`messages` must be a non-empty list.", _FORMAT_HELP)
    out = []
    for i, m in enumerate(msgs):
      if (not isinstance(m, dict) or m.get("role") not in _ROLES
          or not isinstance(m.get("content"), str)):
        raise _fail(source, f"`messages[{i}]` is {m!r}.", _FORMAT_HELP)
      out.append((m["role"], m["content"]))
    if out[-1][0] != "assistant":
      raise _fail(source, "the last message must have role 'assistant' (the"
                  f" answer to train on); got {out[-1][0]!r}.", _FORMAT_HELP)
    return Record(tuple(out), source)
  missing = [k for k in ("prompt", "completion") if k not in obj]
  if missing:
    raise _fail(source, f"missing field(s) {missing}; the line has keys"
                f" {sorted(obj)}.", _FORMAT_HELP)
  for k in ("prompt", "completion"):
    if not isinstance(obj[k], str):
      raise _fail(source, f"field `{k}` must be a string; got"
                  f" {type(obj[k]).__name__}.", _FORMAT_HELP)
  return Record((("user", obj["prompt"]), ("assistant", obj["completion"])),
                source)


def read_jsonl(path: str | os.PathLike) -> list[Record]:
  """Reads a JSONL file of `prompt`/`completion` or chat `messages` lines.

  Blank lines are skipped.

  Args:
    path: The file.

  Returns:
    One `Record` per non-blank line.

  Raises:
    DataError: (a ValueError) if the file is missing, unreadable or empty, or
      a line is not a JSON object of either form; the message names the file
      and line number.
  """
  path = pathlib.Path(path)
  problem = fileio.path_problem(path, kind="file")
  if problem is not None:
    raise DataError(
        f"Data file {str(path)!r} {problem}. Pass the path of a readable"
        " JSONL file (one JSON object per line)."
    )
  try:
    text = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(
        f"Data file {str(path)!r} could not be read as UTF-8 text: {e}."
        " Check its permissions and encoding."
    ) from None
  records = []
  for n, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    source = f"{path}:{n}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise _fail(source, f"not valid JSON ({e.msg} at column {e.colno}).",
                  _FORMAT_HELP) from None
    records.append(_parse_record(obj, source))
  if not records:
    raise DataError(
        f"Data file {str(path)!r} holds no examples. {_FORMAT_HELP}")
  return records


def _template(tokenizer: Tokenizer, messages: list[dict[str, str]],
              add_generation_prompt: bool) -> str:
  return tokenizer.apply_chat_template(
      messages, add_generation_prompt=add_generation_prompt
  )


def tokenize(record: Record, tokenizer: Tokenizer) -> Example:
  """Renders a record with the chat template and marks its answer tokens.

  For each assistant message `i`, the template is rendered for the messages
  before it with the generation prompt (`P_i`) and for the messages up to and
  including it (`F_i`); the text `F_i[len(P_i):]` (the answer and the
  template's end-of-turn marker) carries the loss. The pieces are tokenized
  separately and concatenated, so every token is either all prompt or all
  answer.

  Args:
    record: The conversation.
    tokenizer: The model's tokenizer (`encode`, `apply_chat_template`).

  Returns:
    The tokenized `Example`.

  Raises:
    DataError: If the chat template does not render each conversation prefix
      as a prefix of the longer conversation.
  """
  msgs = [{"role": r, "content": c} for r, c in record.messages]
  pieces: list[tuple[str, bool]] = []
  done = ""
  for i, (role, _) in enumerate(record.messages):
    if role != "assistant":
      continue
    prompt = _template(tokenizer, msgs[:i], True)
    full = _template(tokenizer, msgs[:i + 1], False)
    if not (prompt.startswith(done) and full.startswith(prompt)):
      raise DataError(
          f"{record.source}: the model's chat template does not render the"
          " conversation incrementally (a prefix of the messages does not"
          " render to a prefix of the text), so the answer tokens cannot be"
          " located. Use `prompt`/`completion` lines or a model whose chat"
          " template appends one message at a time."
      )
    pieces.append((prompt[len(done):], False))
    pieces.append((full[len(prompt):], True))
    done = full
  ids: list[int] = []
  mask: list[bool] = []
  for text, is_answer in pieces:
    if not text:
      continue
    toks = list(tokenizer.encode(text, add_special_tokens=False))
    ids.extend(toks)
    mask.extend([is_answer] * len(toks))
  return Example(np.asarray(ids, np.int32), np.asarray(mask, bool), record)


def load_dataset(
    path: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    max_length: int | None = None,
) -> list[Example]:
  """Reads and tokenizes a JSONL file (see `read_jsonl` for the format).

  Args:
    path: The JSONL file.
    tokenizer: The model's tokenizer.
    max_length: If given, every example must have at most this many tokens
      (the sequence length, at most the model's context).

  Returns:
    The tokenized examples, in file order.

  Raises:
    DataError: If the file is malformed, an example has no answer tokens, or
      an example is longer than `max_length`.
  """
  examples = [tokenize(r, tokenizer) for r in read_jsonl(path)]
  for ex in examples:
    if not ex.loss_mask.any():
      raise DataError(
          f"{ex.record.source}: the answer renders to no tokens, so there is"
          " nothing to train on. Give a non-empty completion."
      )
  if max_length is not None:
    too_long = [ex for ex in examples if len(ex) > max_length]
    if too_long:
      worst = max(too_long, key=len)
      raise DataError(
          f"{len(too_long)} example(s) in {str(path)!r} are longer than the"
          f" sequence length {max_length} tokens, e.g."
          f" {worst.record.source} with {len(worst)} tokens. Raise"
          " `--seq-len` (at most the model's context length), or shorten or"
          " drop these examples."
      )
  return examples


def bucket_lengths(seq_len: int, min_bucket: int = 32) -> tuple[int, ...]:
  """Bucket lengths: powers of two from `min_bucket` below `seq_len`, and it.

  Args:
    seq_len: The longest bucket.
    min_bucket: The shortest bucket.

  Returns:
    Increasing lengths ending with `seq_len`.
  """
  out = []
  b = min_bucket
  while b < seq_len:
    out.append(b)
    b *= 2
  out.append(seq_len)
  return tuple(out)


def pad_batch(
    examples: Sequence[Example], length: int, num_rows: int | None = None
) -> Batch:
  """Right-pads examples into a `Batch` of shape `(num_rows, length)`.

  Args:
    examples: At most `num_rows` examples, each at most `length` tokens.
    length: The padded length.
    num_rows: Rows in the batch (default `len(examples)`); missing rows are
      all padding and carry no loss.

  Returns:
    The batch.
  """
  rows = len(examples) if num_rows is None else num_rows
  ids = np.zeros((rows, length), np.int32)
  att = np.zeros((rows, length), np.int32)
  loss = np.zeros((rows, length), np.float32)
  for i, ex in enumerate(examples):
    n = len(ex)
    ids[i, :n] = ex.input_ids
    att[i, :n] = 1
    loss[i, :n] = ex.loss_mask
  return Batch(ids, att, loss)


def _bucket_for(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}.")


class Batcher:
  """Deterministic, resumable, length-bucketed batches for training.

  The examples of each epoch are shuffled with `(seed, epoch)`, split into
  windows of `sort_window` steps, sorted by length within a window and cut
  into steps, so the examples of one step have similar lengths; each step is
  padded to the smallest bucket that holds its longest example. `batch(step)`
  is a pure function of the step number, so a resumed run sees exactly the
  data an uninterrupted run would have seen.

  Attributes:
    examples: The training examples.
    batch_size: Examples per micro-batch.
    grad_accum: Micro-batches per step.
    buckets: The allowed padded lengths.
    seed: Shuffling seed.
    sort_window: Steps per length-sorting window.
  """

  def __init__(
      self,
      examples: Sequence[Example],
      *,
      batch_size: int,
      seq_len: int,
      grad_accum: int = 1,
      seed: int = 0,
      sort_window: int = 16,
  ):
    if batch_size < 1 or grad_accum < 1:
      raise ValueError(
          f"`batch_size` and `grad_accum` must be >= 1; got {batch_size} and"
          f" {grad_accum}."
      )
    if not examples:
      raise ValueError("`examples` is empty; there is nothing to train on.")
    longest = max(len(ex) for ex in examples)
    if longest > seq_len:
      raise ValueError(
          f"The longest example has {longest} tokens, more than `seq_len`="
          f"{seq_len}. Raise `seq_len` or drop long examples."
      )
    self.examples = list(examples)
    self.batch_size = batch_size
    self.grad_accum = grad_accum
    self.buckets = bucket_lengths(seq_len)
    self.seed = seed
    self.sort_window = sort_window
    self._epoch_cache: dict[int, list[list[int]]] = {}

  @property
  def examples_per_step(self) -> int:
    return self.batch_size * self.grad_accum

  @property
  def steps_per_epoch(self) -> int:
    return max(1, len(self.examples) // self.examples_per_step)

  def _epoch(self, epoch: int) -> list[list[int]]:
    if epoch not in self._epoch_cache:
      rng = np.random.default_rng([self.seed, epoch])
      order = rng.permutation(len(self.examples))
      per = self.examples_per_step
      n_steps = self.steps_per_epoch
      if len(order) < per:  # Fewer examples than one step: repeat them.
        order = np.resize(order, per)
      order = order[:n_steps * per]
      steps = []
      window = self.sort_window * per
      for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window],
                       key=lambda i: len(self.examples[i]))
        steps.extend(
            [list(chunk[s:s + per]) for s in range(0, len(chunk), per)]
        )
      rng.shuffle(steps)
      self._epoch_cache = {epoch: steps}  # Keep one epoch in memory.
    return self._epoch_cache[epoch]

  def batch(self, step: int) -> Batch:
    """The batch of training step `step` (0-based), shaped `(accum, B, L)`."""
    epoch, i = divmod(step, self.steps_per_epoch)
    idx = self._epoch(epoch)[i]
    exs = [self.examples[j] for j in idx]
    length = _bucket_for(max(len(e) for e in exs), self.buckets)
    b = pad_batch(exs, length)
    shape = (self.grad_accum, self.batch_size, length)
    return Batch(b.input_ids.reshape(shape), b.attention_mask.reshape(shape),
                 b.loss_mask.reshape(shape))

  def __iter__(self) -> Iterator[Batch]:
    step = 0
    while True:
      yield self.batch(step)
      step += 1


def steps_for_epochs(epochs: float, num_examples: int,
                     examples_per_step: int) -> int:
  """Number of steps that covers `epochs` passes over the data.

  Uses the batcher's epoch length (`num_examples // examples_per_step` full
  steps; the remainder of a shuffle is left out), so `epochs=1` is exactly
  one shuffled pass and never spills into the next epoch's order.
  """
  per_epoch = max(1, num_examples // examples_per_step)
  return max(1, round(epochs * per_epoch))
