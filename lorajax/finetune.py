"""LoRA fine-tuning of causal language models, as library functions.

The same loop as `lorajax finetune`, for use from your own JAX code:

  >>> import jax
  >>> from lorajax import finetune
  >>> from lorajax.models import llama
  >>> model, params = llama.from_pretrained(llama.default_model_path())
  >>> tok = model.tokenizer
  >>> train = finetune.load_dataset(finetune.bundled_data("train"), tok)
  >>> held_out = finetune.load_dataset(finetune.bundled_data("eval"), tok)
  >>> config = finetune.TrainConfig()  # r=16, alpha=32, all-linear, lr 5e-4
  >>> state = finetune.train(model, params, train, config,
  ...                        key=jax.random.key(0))  # doctest: +SKIP
  >>> finetune.evaluate(model, params, state.adapter,
  ...                   held_out[:48]).exact_match  # doctest: +SKIP
  0.9375
"""

import pathlib

from lorajax._src.app.data import (
    Batch,
    Batcher,
    DataError,
    Example,
    Record,
    load_dataset,
    read_jsonl,
    tokenize,
)
from lorajax._src.app.finetune import (
    DEFAULT_LEARNING_RATE,
    EvalResult,
    TrainConfig,
    TrainState,
    auto_merged,
    evaluate,
    generate_answers,
    init_state,
    loss_sums,
    make_train_step,
    train,
)
from lorajax._src.app.run_dir import plot_loss


def bundled_data(split: str) -> pathlib.Path:
  """Path of the bundled word-reversal dataset: `"train"` or `"eval"`.

  Args:
    split: `"train"` (2000 examples) or `"eval"` (200 held-out examples).

  Returns:
    The JSONL file's path.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"`split` must be 'train' or 'eval'; got {split!r}.")
  return pathlib.Path(__file__).parent / "data" / f"reverse_words_{split}.jsonl"


__all__ = (
    "DEFAULT_LEARNING_RATE",
    "Batch",
    "Batcher",
    "DataError",
    "EvalResult",
    "Example",
    "Record",
    "TrainConfig",
    "TrainState",
    "auto_merged",
    "bundled_data",
    "evaluate",
    "generate_answers",
    "init_state",
    "load_dataset",
    "loss_sums",
    "make_train_step",
    "plot_loss",
    "read_jsonl",
    "tokenize",
    "train",
)
