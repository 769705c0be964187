"""The fine-tuning data pipeline: JSONL parsing, loss masks, bucketing, loss."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _finetune_testing import write_reverse_data, write_tiny_model

from lorajax import finetune
from lorajax._src.app import data as data_lib
from lorajax.models import llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = write_tiny_model(tmp_path_factory.mktemp("data") / "model")
  model, params = llama.from_pretrained(d)
  return model, params


def _write(path, lines):
  path.write_text("".join(
      (line if isinstance(line, str) else json.dumps(line)) + "\n"
      for line in lines))
  return path


def _chatml(role, content):
  # Written out by hand, independently of the tokenizer's template.
  return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def test_prompt_completion_mask(tiny, tmp_path):
  model, _ = tiny
  tok = model.tokenizer
  path = _write(tmp_path / "d.jsonl", [
      {"prompt": "hello there", "completion": "general kenobi"}])
  (ex,) = finetune.load_dataset(path, tok)
  ids, mask = ex.input_ids, ex.loss_mask
  # The byte tokenizer makes every character (or special token) one token.
  prompt_text = _chatml("user", "hello there") + "<|im_start|>assistant\n"
  answer_text = "general kenobi<|im_end|>\n"
  assert tok.decode(ids, skip_special_tokens=False) == prompt_text + answer_text
  # Loss exactly on the answer and the end-of-turn marker: a suffix.
  n_answer = len(tok.encode(answer_text))
  expected = np.zeros(len(ids), bool)
  expected[-n_answer:] = True
  np.testing.assert_array_equal(mask, expected)
  assert tok.decode(ids[mask], skip_special_tokens=False) == answer_text
  assert tok.decode(ids[~mask], skip_special_tokens=False) == prompt_text


def test_multi_turn_messages_mask(tiny, tmp_path):
  model, _ = tiny
  tok = model.tokenizer
  msgs = [
      {"role": "system", "content": "be brief"},
      {"role": "user", "content": "one"},
      {"role": "assistant", "content": "uno"},
      {"role": "user", "content": "two"},
      {"role": "assistant", "content": "dos"},
  ]
  path = _write(tmp_path / "d.jsonl", [{"messages": msgs}])
  (ex,) = finetune.load_dataset(path, tok)
  text = "".join(_chatml(m["role"], m["content"]) for m in msgs)
  assert tok.decode(ex.input_ids, skip_special_tokens=False) == text
  # Build the expected mask independently: character spans of the answers.
  expected = []
  for m in msgs:
    piece = _chatml(m["role"], m["content"])
    if m["role"] == "assistant":
      head = f"<|im_start|>{m['role']}\n"
      n_head = len(tok.encode(head))
      n_rest = len(tok.encode(piece)) - n_head
      expected += [False] * n_head + [True] * n_rest
    else:
      expected += [False] * len(tok.encode(piece))
  np.testing.assert_array_equal(ex.loss_mask, np.array(expected))
  assert ex.record.answer == "dos"
  assert [m["content"] for m in ex.record.prompt_messages] == [
      "be brief", "one", "uno", "two"]


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", r"d\.jsonl:2: not valid JSON"),
        ({"prompt": "x"}, r"d\.jsonl:2: missing field\(s\) \['completion'\]"),
        ({"prompt": "x", "completion": 3}, r"d\.jsonl:2: field `completion`"
         " must be a string"),
        ([1, 2], r"d\.jsonl:2: expected a JSON object; got list"),
        ({"messages": [{"role": "user", "content": "x"}]},
         r"d\.jsonl:2: the last message must have role 'assistant'"),
        ({"messages": [{"role": "robot", "content": "x"}]},
         r"d\.jsonl:2: `messages\[0\]` is"),
        ({"messages": []}, r"d\.jsonl:2: `messages` must be a non-empty"),
    ],
    ids=["bad-json", "missing-field", "wrong-type", "not-object",
         "no-assistant", "bad-role", "empty-messages"],
)
def test_bad_lines_name_file_and_line(tmp_path, line, match):
  path = _write(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"},
                                       line])
  with pytest.raises(finetune.DataError, match=match):
    finetune.read_jsonl(path)


def test_missing_and_empty_files(tmp_path):
  with pytest.raises(finetune.DataError, match="does not exist"):
    finetune.read_jsonl(tmp_path / "nope.jsonl")
  (tmp_path / "empty.jsonl").write_text("\n\n")
  with pytest.raises(finetune.DataError, match="holds no examples"):
    finetune.read_jsonl(tmp_path / "empty.jsonl")
  (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00bad")
  with pytest.raises(finetune.DataError, match="could not be read as UTF-8"):
    finetune.read_jsonl(tmp_path / "bin.jsonl")


def test_too_long_and_empty_answer(tiny, tmp_path):
  model, _ = tiny
  path = _write(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"},
                                       {"prompt": "a" * 50,
                                        "completion": "b"}])
  with pytest.raises(finetune.DataError,
                     match=r"1 example\(s\) .* longer than the sequence length"
                     r" 40 tokens, e\.g\. .*d\.jsonl:2 with \d+ tokens"):
    finetune.load_dataset(path, model.tokenizer, max_length=40)
  assert len(finetune.load_dataset(path, model.tokenizer)) == 2


def test_bucketed_batches(tiny, tmp_path):
  model, _ = tiny
  path = tmp_path / "d.jsonl"
  # Lengths vary a lot: short and long prompts.
  rows = [{"prompt": "x" * (3 if i % 2 else 60), "completion": "y" * (i % 5)
           + "z"} for i in range(40)]
  _write(path, rows)
  exs = finetune.load_dataset(path, model.tokenizer)
  lengths = np.array([len(e) for e in exs])
  b = finetune.Batcher(exs, batch_size=2, grad_accum=2, seq_len=128, seed=1)
  assert b.steps_per_epoch == 10
  seen = []
  padded = real = 0
  for step in range(b.steps_per_epoch):
    batch = b.batch(step)
    ids = batch.input_ids
    assert ids.shape[:2] == (2, 2)
    assert ids.shape[2] in data_lib.bucket_lengths(128)
    assert ids.shape[2] >= batch.attention_mask.sum(-1).max()
    # Smallest bucket that fits: the next smaller bucket would not.
    smaller = [x for x in data_lib.bucket_lengths(128) if x < ids.shape[2]]
    if smaller:
      assert batch.attention_mask.sum(-1).max() > smaller[-1]
    padded += ids.size
    real += batch.num_tokens
    for row_ids, row_att, row_loss in zip(
        ids.reshape(4, -1), batch.attention_mask.reshape(4, -1),
        batch.loss_mask.reshape(4, -1)):
      n = int(row_att.sum())
      assert row_att[:n].all() and not row_att[n:].any()  # right padding
      match = [i for i, e in enumerate(exs) if len(e) == n
               and np.array_equal(e.input_ids, row_ids[:n])
               and np.array_equal(e.loss_mask, row_loss[:n] > 0)]
      assert match, "a row is not an example with its mask"
      assert not row_loss[n:].any()
      seen.append(n)
  # An epoch visits every example once.
  assert sorted(seen) == sorted(lengths.tolist())
  # Sorting within the window groups similar lengths: here every example
  # is padded only to its own bucket, far less than padding to seq_len.
  ideal = sum(min(x for x in data_lib.bucket_lengths(128) if x >= n)
              for n in lengths)
  assert padded == ideal < 0.7 * len(exs) * 128
  assert real / padded > 0.6
  # The order is a pure function of (seed, step): a new Batcher agrees.
  b2 = finetune.Batcher(exs, batch_size=2, grad_accum=2, seq_len=128, seed=1)
  for step in (0, 7, 13, 25):
    np.testing.assert_array_equal(b.batch(step).input_ids,
                                  b2.batch(step).input_ids)
  b3 = finetune.Batcher(exs, batch_size=2, grad_accum=2, seq_len=128, seed=2)
  assert any(b.batch(s).input_ids.shape != b3.batch(s).input_ids.shape
             or not np.array_equal(b.batch(s).input_ids, b3.batch(s).input_ids)
             for s in range(10))


def test_batcher_errors(tiny, tmp_path):
  model, _ = tiny
  path = _write(tmp_path / "d.jsonl", [{"prompt": "abc", "completion": "d"}])
  exs = finetune.load_dataset(path, model.tokenizer)
  with pytest.raises(ValueError, match="more than `seq_len`=8"):
    finetune.Batcher(exs, batch_size=1, seq_len=8)
  with pytest.raises(ValueError, match="`batch_size` and `grad_accum` must"):
    finetune.Batcher(exs, batch_size=0, seq_len=128)
  with pytest.raises(ValueError, match="`examples` is empty"):
    finetune.Batcher([], batch_size=1, seq_len=128)
  # Fewer examples than a step: they are repeated to fill it.
  b = finetune.Batcher(exs, batch_size=3, seq_len=128)
  assert b.batch(0).input_ids.shape == (1, 3, 32)


def test_loss_sums_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  ids = rng.integers(0, 7, size=(2, 5))
  mask = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], np.float32)
  s, n = finetune.loss_sums(jnp.asarray(logits), jnp.asarray(ids),
                            jnp.asarray(mask))
  want = 0.0
  for b in range(2):
    for t in range(1, 5):
      if mask[b, t]:
        row = logits[b, t - 1].astype(np.float64)
        want -= row[ids[b, t]] - np.log(np.exp(row).sum())
  assert float(n) == 6
  np.testing.assert_allclose(float(s), want, rtol=1e-5)


def test_grad_accumulation_equals_big_batch(tiny, tmp_path):
  model, params = tiny
  path = tmp_path / "d.jsonl"
  write_reverse_data(path, 8)
  exs = finetune.load_dataset(path, model.tokenizer)
  config = finetune.TrainConfig(learning_rate=1e-2, mode="merged")
  state = finetune.init_state(params, config, key=jax.random.key(0))
  # Perturb b so that both a and b get gradients.
  state = state._replace(adapter=jax.tree.map(
      lambda x: x + 0.05 * jnp.ones_like(x), state.adapter))
  batch = data_lib.pad_batch(exs[:4], 64)
  step = finetune.make_train_step(model, config.optimizer(),
                                  mode="merged").step

  def arrays(b, shape):
    return tuple(jnp.asarray(x.reshape(shape)) for x in
                 (b.input_ids, b.attention_mask, b.loss_mask))

  copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731 (donated)
  ad1, _, m1 = step(params, copy(state.adapter), copy(state.opt_state),
                    arrays(batch, (1, 4, 64)))
  ad2, _, m2 = step(params, copy(state.adapter), copy(state.opt_state),
                    arrays(batch, (2, 2, 64)))
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
  assert float(m1["tokens"]) == batch.loss_mask[:, 1:].sum()
  for x, y in zip(jax.tree.leaves(ad1), jax.tree.leaves(ad2)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4,
                               atol=1e-6)
  # The loss it reports is the mean completion-token loss of the model.
  merged = jax.tree.map(jnp.asarray, params)
  import lorajax

  logits = model.apply(lorajax.merge(merged, state.adapter),
                       batch.input_ids, batch.attention_mask)
  s, n = finetune.loss_sums(logits, batch.input_ids, batch.loss_mask)
  np.testing.assert_allclose(float(m1["loss"]), float(s / n), rtol=1e-5)


def test_train_config_validation():
  with pytest.raises(ValueError, match="`steps` must be an integer >= 1"):
    finetune.TrainConfig(steps=0)
  with pytest.raises(ValueError, match="`mode` must be one of"):
    finetune.TrainConfig(mode="fast")
  with pytest.raises(ValueError,
                     match="`learning_rate` must be a finite number > 0"):
    finetune.TrainConfig(learning_rate=0.0)
  with pytest.raises(ValueError, match="`epochs` must be a finite number > 0"):
    finetune.TrainConfig(epochs=0)
  with pytest.raises(TypeError, match="`lora` must be a LoraConfig"):
    finetune.TrainConfig(lora={"rank": 4})
  c = finetune.TrainConfig(epochs=2.5, batch_size=4, grad_accum=2)
  assert c.num_steps(100) == 30  # 2.5 epochs of 100 // 8 = 12 full steps
  assert finetune.TrainConfig.from_dict(c.to_dict()) == c


class _FakeTokenizer:
  eos_id, pad_id = 2, 0

  def apply_chat_template(self, messages, add_generation_prompt=True):
    return "|".join(m["content"] for m in messages) + "|"

  def encode(self, text, add_special_tokens=False):
    return [100 + ord(c) % 50 for c in text]

  def decode(self, ids, skip_special_tokens=True):
    return " ".join(f"t{i}" for i in ids)


class _FakeModel:
  """Generates 5, 6, <end of turn 7>, 8: 7 is a stop id only in the config."""

  tokenizer = _FakeTokenizer()
  config = llama.LlamaConfig(eos_token_id=2, eos_token_ids=(2, 7))

  def __init__(self):
    self.eos_seen = None

  def generate(self, params, ids, max_new_tokens, *, temperature,
               attention_mask, eos_id):
    self.eos_seen = eos_id
    row = [5, 6, 7, 8] + [0] * (max_new_tokens - 4)
    return np.asarray([row] * ids.shape[0], np.int32)


def test_generate_answers_stops_at_every_end_token():
  model = _FakeModel()
  rec = data_lib.Record(messages=(("user", "hi"), ("assistant", "x")),
                        source="t:1")
  got = finetune.generate_answers(model, {}, None, [rec, rec],
                                  max_new_tokens=8, batch_size=2)
  assert got == ["t5 t6", "t5 t6"]
  assert set(model.eos_seen) == {2, 7}


@pytest.mark.parametrize("epochs,n,per,want", [
    (1, 100, 8, 12),   # 12 full steps of 8 = one shuffled pass (4 left out)
    (2, 100, 8, 24),
    (0.5, 100, 8, 6),
    (1, 5, 8, 1),      # fewer examples than a step: still one step
])
def test_steps_for_epochs_matches_the_batcher_epoch(epochs, n, per, want):
  assert data_lib.steps_for_epochs(epochs, n, per) == want
