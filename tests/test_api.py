"""The public surface: every API change shows up as a diff here."""

import lorajax
import lorajax.peft


def test_public_names():
  assert list(lorajax.__all__) == sorted(lorajax.__all__)
  for name in lorajax.__all__:
    assert getattr(lorajax, name) is not None, name
  assert set(lorajax.__all__) >= {
      "LoraConfig", "LoraWeight", "init", "merge", "unmerge", "summary",
      "lora", "infer_axes", "lora_plus", "decay_mask",
      # PEFT's methods (docs/methods.md).
      "VeraConfig", "VeraWeight", "decompose", "eva_init",
  }
  assert set(lorajax.peft.__all__) >= {"load", "save", "to_lora"}


def test_init_key_is_keyword_only_without_default():
  import inspect
  sig = inspect.signature(lorajax.init)
  key = sig.parameters["key"]
  assert key.kind is inspect.Parameter.KEYWORD_ONLY
  assert key.default is inspect.Parameter.empty
