"""The public surface: every API change shows up as a diff here.

The sets are exact (not supersets): adding, removing or renaming a public
name fails this test until the snapshot is updated on purpose.
"""

import importlib
import inspect
import warnings

import pytest

import lorajax
import lorajax.finetune
import lorajax.models.llama
import lorajax.multi
import lorajax.optim
import lorajax.peft
import lorajax.plan
import lorajax.quant
import lorajax.sharding

CORE = {
    "CheckpointManager", "CorruptCheckpointError", "LoraConfig",
    "LoraFallbackError", "LoraFallbackWarning", "LoraWeight", "TrainStep",
    "adapter_shardings", "delta", "init", "init_sharded", "is_lora",
    "is_node", "lora", "make_train_step", "merge", "precision_policy",
    "quantize", "select_linear", "summary", "unmerge",
    # Public submodules.
    "multi", "optim", "peft", "quant", "sharding",
    # PEFT's methods (docs/methods.md).
    "VeraConfig", "VeraWeight", "decompose", "eva_init",
}

SUBMODULES = {
    lorajax.optim: {"decay_mask", "lora_plus"},
    lorajax.multi: {"BASE_ID", "AdapterSet", "LoraSetWeight", "SlotInfo",
                    "active_slots", "add", "add_weighted_adapter", "build",
                    "dare_mask", "load", "lora", "per_slot", "remove",
                    "replace", "save"},
    lorajax.peft: {"load", "save", "to_lora"},
    lorajax.plan: {"CHIPS", "PRESETS", "Chip", "PlanError", "PlanReport",
                   "collectives", "parse_mesh", "plan"},
    lorajax.quant: {"FORMATS", "MergedWeight", "QuantizationWarning",
                    "QuantizedWeight",
                    "dequantize", "is_quantized", "loftq", "quantize"},
    lorajax.sharding: {"adapter_shardings", "global_batch", "infer_axes",
                       "init_sharded"},
    lorajax.models.llama: {"LlamaConfig", "LlamaModel", "REMAT_POLICIES",
                           "SCAN_MIN_LAYERS", "Tokenizer",
                           "default_model_path", "from_pretrained",
                           "init_params", "save_pretrained", "stack_layers",
                           "unstack_layers"},
}


def test_public_names_exact():
  assert list(lorajax.__all__) == sorted(lorajax.__all__)
  assert set(lorajax.__all__) == CORE
  for name in lorajax.__all__:
    assert getattr(lorajax, name) is not None, name
  # Nothing else public sneaks in through an import.
  public = {n for n, v in vars(lorajax).items()
            if not n.startswith("_") and not inspect.ismodule(v)}
  assert public <= CORE, public - CORE


@pytest.mark.parametrize("module", list(SUBMODULES),
                         ids=[m.__name__ for m in SUBMODULES])
def test_submodule_names_exact(module):
  # Ordered as ruff's RUF022 sorts it (constants first, then classes and
  # functions), which tests/test_lint.py enforces.
  assert len(set(module.__all__)) == len(module.__all__)
  assert set(module.__all__) == SUBMODULES[module]
  for name in module.__all__:
    assert getattr(module, name) is not None


def test_import_lorajax_does_not_import_plan():
  # `lorajax.plan` pulls in the app layer (models, finetune): opt-in only.
  import subprocess
  import sys

  code = ("import sys, lorajax; print('lorajax.plan' in sys.modules,"
          " 'lorajax._src.app.plan' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True).stdout.split()
  assert out == ["False", "False"]


def test_sharding_module_reexports_the_core_objects():
  assert lorajax.sharding.adapter_shardings is lorajax.adapter_shardings
  assert lorajax.sharding.init_sharded is lorajax.init_sharded


@pytest.mark.parametrize("name,new", [
    ("global_batch", "lorajax.sharding.global_batch"),
    ("infer_axes", "lorajax.sharding.infer_axes"),
    ("lora_plus", "lorajax.optim.lora_plus"),
    ("decay_mask", "lorajax.optim.decay_mask"),
    ("path_str", "jax.tree_util.keystr"),
    ("Summary", "lorajax.summary"),
    ("WeightPlan", "LoraConfig.plan"),
])
def test_removed_names_warn_and_still_work(name, new):
  with pytest.warns(DeprecationWarning,
                    match=rf"`lorajax\.{name}` is deprecated and will be"
                    rf" removed in lorajax 0\.2\.0; .*`{new}"):
    obj = getattr(lorajax, name)
  assert obj is not None and name not in lorajax.__all__
  if new.startswith(("lorajax.sharding.", "lorajax.optim.")):
    mod, attr = new.rsplit(".", 1)
    assert obj is getattr(importlib.import_module(mod), attr)


def test_old_names_keep_their_meaning():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import jax
    import jax.numpy as jnp
    kp = jax.tree_util.tree_flatten_with_path({"a": {"b": jnp.ones(1)}})[0]
    assert lorajax.path_str(kp[0][0]) == "a/b"
    s = lorajax.summary({"w": jnp.ones((4, 4))}, {"w": None})
    assert isinstance(s, lorajax.Summary)


def test_unknown_name_is_attribute_error():
  with pytest.raises(AttributeError, match=r"has no attribute 'nope'"):
    lorajax.nope  # noqa: B018


def test_init_key_is_keyword_only_without_default():
  sig = inspect.signature(lorajax.init)
  key = sig.parameters["key"]
  assert key.kind is inspect.Parameter.KEYWORD_ONLY
  assert key.default is inspect.Parameter.empty


def test_train_step_argument_order():
  """One argument order: `step(params, adapter, opt_state, batch)`."""
  assert lorajax.TrainStep._fields == ("init", "step")
  sig = inspect.signature(lorajax.make_train_step)
  assert list(sig.parameters)[:2] == ["loss_fn", "optimizer"]
  assert all(p.kind is inspect.Parameter.KEYWORD_ONLY
             for p in list(sig.parameters.values())[2:])
  assert callable(lorajax.finetune.make_train_step)
