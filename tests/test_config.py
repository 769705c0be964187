"""LoraConfig: validation, target presets, patterns, and every error."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

import lorajax


def _llama_like():
  z = lambda *s: jnp.zeros(s)  # noqa: E731
  layer = {
      "self_attn": {n: {"kernel": z(8, 8)} for n in ("q_proj", "k_proj",
                                                     "v_proj", "o_proj")},
      "mlp": {n: {"kernel": z(8, 16) if n != "down_proj" else z(16, 8)}
              for n in ("gate_proj", "up_proj", "down_proj")},
      "input_layernorm": {"scale": z(8)},
  }
  return {"model": {"embed_tokens": {"embedding": z(32, 8)},
                    "layers": {"0": layer, "1": layer},
                    "norm": {"scale": z(8)}},
          "lm_head": {"kernel": z(8, 32)}}


def _targets(params, **kw):
  return sorted(lorajax.LoraConfig(**kw).plan(params))


def test_config_is_frozen_and_hashable():
  cfg = lorajax.LoraConfig(rank=4, targets=["a", "b"],
                           rank_pattern={"a": 2}, axes={"c": "sio"})
  assert hash(cfg) == hash(lorajax.LoraConfig(
      rank=4, targets=("a", "b"), rank_pattern={"a": 2}, axes={"c": "sio"}))
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.rank = 3
  assert lorajax.LoraConfig.from_dict(cfg.to_dict()) == cfg


def test_all_linear_preset_skips_embeddings_heads_and_norms():
  got = _targets(_llama_like(), targets="all-linear")
  assert len(got) == 14
  assert all(("self_attn" in p or "mlp" in p) and p.endswith("kernel")
             for p in got)


def test_attention_and_mlp_presets():
  params = _llama_like()
  att = _targets(params, targets="attention")
  mlp = _targets(params, targets="mlp")
  assert len(att) == 8 and all("self_attn" in p for p in att)
  assert len(mlp) == 6 and all("/mlp/" in p for p in mlp)
  both = _targets(params, targets=["attention", "mlp"])
  assert both == sorted(att + mlp)
  assert _targets(params, targets="all-linear", exclude="mlp") == att


def test_presets_cover_other_naming_conventions():
  z = jnp.zeros((4, 4))
  params = {"attn": {n: {"kernel": z} for n in ("query", "key", "value",
                                                "out")},
            "ffn": {n: {"kernel": z} for n in ("wi", "wo", "fc1", "fc2")}}
  assert len(_targets(params, rank=2, targets="attention")) == 4
  assert len(_targets(params, rank=2, targets="mlp")) == 4


def test_regex_targets_use_fullmatch_and_exclude():
  params = _llama_like()
  assert _targets(params, targets=r".*q_proj/kernel") == [
      "model/layers/0/self_attn/q_proj/kernel",
      "model/layers/1/self_attn/q_proj/kernel"]
  assert _targets(params, targets=r".*q_proj/kernel",
                  exclude=r"model/layers/1/.*") == [
                      "model/layers/0/self_attn/q_proj/kernel"]


def test_rank_and_alpha_patterns_follow_peft_suffix_semantics():
  plans = lorajax.LoraConfig(
      rank=4, alpha=8.0, targets="all-linear",
      rank_pattern={"q_proj": 2, r"layers/1/mlp/down_proj": 8},
      alpha_pattern={"v_proj": 1.0}, use_rslora=True,
  ).plan(_llama_like())
  assert plans["model/layers/0/self_attn/q_proj/kernel"].rank == 2
  assert plans["model/layers/1/mlp/down_proj/kernel"].rank == 8
  assert plans["model/layers/0/mlp/down_proj/kernel"].rank == 4
  v = plans["model/layers/0/self_attn/v_proj/kernel"]
  assert v.alpha == 1.0 and v.scale == pytest.approx(1.0 / 2.0)
  # `proj` alone is not a suffix at a `/` boundary of `q_proj`.
  with pytest.raises(ValueError, match="`rank_pattern` key 'proj' matches"):
    lorajax.LoraConfig(targets="all-linear",
                       rank_pattern={"proj": 2}).plan(_llama_like())


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(rank=0), ValueError, r"`rank` must be >= 1; got rank=0"),
    (dict(rank=2.5), TypeError, r"`rank` must be an int"),
    (dict(alpha=0.0), ValueError, r"`alpha` must be > 0"),
    (dict(alpha="x"), TypeError, r"`alpha` must be a number"),
    (dict(targets="(unclosed"), ValueError, r"`targets` holds an invalid"),
    (dict(targets=[]), ValueError, r"`targets` is empty"),
    (dict(targets=3), TypeError, r"`targets` must be a regex string"),
    (dict(exclude="[z-a]"), ValueError, r"`exclude` holds an invalid regex"),
    (dict(rank_pattern={"(": 2}), ValueError, r"`rank_pattern` holds an"),
    (dict(rank_pattern={"q": 0}), ValueError, r"rank_pattern\['q'\]` must"),
    (dict(rank_pattern={"q": "2"}), TypeError, r"rank_pattern\['q'\]` must"),
    (dict(rank_pattern=5), TypeError, r"`rank_pattern` must map regex"),
    (dict(alpha_pattern={"q": -1.0}), ValueError, r"alpha_pattern\['q'\]`"),
    (dict(axes={"w": "ixo"}), ValueError, r"may only contain the letters"),
    (dict(init="kaiming"), ValueError, r"`init` must be 'lora' or"),
    (dict(param_dtype="int32"), ValueError,
     r"`param_dtype` must be a floating dtype"),
    (dict(param_dtype="nonsense"), TypeError, r"`param_dtype` is not a"),
    (dict(alpha=float("inf")), ValueError, r"`alpha` must be > 0 and finite"),
    (dict(alpha=float("nan")), ValueError, r"`alpha` must be > 0 and finite"),
    (dict(alpha_pattern={"q": float("inf")}), ValueError,
     r"alpha_pattern\['q'\]` must be > 0 and finite"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_invalid_config_values(kwargs, error, match):
  with pytest.raises(error, match=match):
    lorajax.LoraConfig(**kwargs)


def test_targets_matching_nothing_lists_available_paths():
  with pytest.raises(ValueError, match=r"match no weight") as e:
    lorajax.LoraConfig(targets=".*qproj").plan(_llama_like())
  assert "model/layers/0/self_attn/q_proj/kernel (8, 8) float32" in str(
      e.value)


def test_rank_above_min_dim_names_the_weight():
  params = {"blk": {"kernel": jnp.zeros((16, 3))}}
  with pytest.raises(ValueError, match=re.escape(
      "rank 4 for 'blk/kernel' (shape (16, 3), axes 'io': d_in=16, "
      "d_out=3) exceeds min(d_in, d_out)=3")):
    lorajax.init(params, lorajax.LoraConfig(rank=4, targets=".*"),
                 key=jax.random.key(0))


def test_rank_checks_use_products_of_multi_axis_dims():
  params = {"att": {"kernel": jnp.zeros((32, 2, 4))}}
  cfg = lorajax.LoraConfig(rank=8, targets=".*", axes={".*": "ioo"})
  assert cfg.plan(params)["att/kernel"].rank == 8  # d_out = 2 * 4 = 8.
  with pytest.raises(ValueError, match="d_out=8"):
    lorajax.LoraConfig(rank=9, targets=".*", axes={".*": "ioo"}).plan(params)


def test_weight_with_more_axes_needs_an_axes_entry():
  params = {"layers": {"kernel": jnp.zeros((4, 8, 8))}}
  with pytest.raises(ValueError, match=r"needs an `axes` entry.*'sio'"):
    lorajax.init(params, lorajax.LoraConfig(rank=2, targets=".*"),
                 key=jax.random.key(0))


@pytest.mark.parametrize("axes,match", [
    ("io", r"has 2 letters but the weight has shape \(4, 8, 8\)"),
    ("sso", r"needs at least one 'i'"),
], ids=["length", "no-input"])
def test_bad_axes_strings_for_a_weight(axes, match):
  params = {"layers": {"kernel": jnp.zeros((4, 8, 8))}}
  with pytest.raises(ValueError, match=match):
    lorajax.LoraConfig(rank=2, targets=".*",
                       axes={".*": axes}).plan(params)


def test_axes_key_matching_nothing():
  with pytest.raises(ValueError, match=r"`axes` key 'nope' fullmatches no"):
    lorajax.LoraConfig(rank=1, targets=".*kernel", axes={"nope": "sio"}).plan(
        {"kernel": jnp.zeros((2, 2))})


def test_non_floating_weight_is_rejected():
  params = {"codes": {"kernel": jnp.zeros((8, 8), jnp.int8)}}
  with pytest.raises(ValueError, match=r"'codes/kernel' matches the targets "
                     r"but has dtype int8"):
    lorajax.LoraConfig(targets=".*kernel").plan(params)


def test_one_dimensional_weight_is_rejected():
  with pytest.raises(ValueError, match=r"'norm/scale' matches the targets "
                     r"but has shape \(8,\)"):
    lorajax.LoraConfig(targets=".*").plan({"norm": {"scale": jnp.zeros(8)}})


def test_all_errors_are_reported_at_once():
  params = {"x": {"kernel": jnp.zeros((2, 3, 3))},
            "y": {"kernel": jnp.zeros((8, 1))}}
  with pytest.raises(ValueError) as e:
    lorajax.LoraConfig(rank=2, targets=".*").plan(params)
  assert "'x/kernel'" in str(e.value) and "'y/kernel'" in str(e.value)


def test_init_requires_a_config_and_keyword_key():
  with pytest.raises(TypeError, match="`config` must be a LoraConfig"):
    lorajax.init({"w": jnp.zeros((2, 2))}, {"rank": 1},
                 key=jax.random.key(0))
  with pytest.raises(TypeError):
    lorajax.init({"w": jnp.zeros((2, 2))},  # pylint: disable=missing-kwoa
                 lorajax.LoraConfig(rank=1, targets="w"))


def test_adapter_that_does_not_fit_the_params():
  params = {"a": {"kernel": jnp.zeros((8, 8))}}
  adapter = lorajax.init(params, lorajax.LoraConfig(rank=2, targets=".*"),
                         key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"structure does not fit.*\n  a/kernel"):
    lorajax.merge({"b": {"kernel": jnp.zeros((8, 8))}}, adapter)
  with pytest.raises(ValueError, match=(
      r"'a/kernel': weight shape \(8, 4\) "
      r"with axes 'io' does not fit adapter a\(8, 2\) b\(2, 8\)")):
    lorajax.merge({"a": {"kernel": jnp.zeros((8, 4))}}, adapter)
  with pytest.raises(ValueError, match=r"has 2 letters but the weight has "
                     r"shape \(8, 8, 1\)"):
    lorajax.unmerge({"a": {"kernel": jnp.zeros((8, 8, 1))}}, adapter)
  with pytest.raises(ValueError, match=r"expected a LoraWeight or None"):
    lorajax.merge(params, {"a": {"kernel": jnp.zeros((8, 8))}})


def test_config_is_keyword_only():
  with pytest.raises(TypeError, match=r"positional"):
    lorajax.LoraConfig(8)  # type: ignore[misc]


def test_dtype_is_a_deprecated_alias_of_param_dtype():
  with pytest.warns(DeprecationWarning, match=r"use `param_dtype`"):
    config = lorajax.LoraConfig(rank=2, dtype="bfloat16")
  assert config.param_dtype == "bfloat16"
  with pytest.warns(DeprecationWarning, match=r"`LoraConfig.dtype` is dep"):
    assert config.dtype == "bfloat16"
  # Configs saved before the rename (key "dtype") still load, silently.
  old = {**lorajax.LoraConfig(rank=2).to_dict()}
  old["dtype"] = old.pop("param_dtype")
  old["dtype"] = "bfloat16"
  assert lorajax.LoraConfig.from_dict(old) == config
  adapter = lorajax.init({"w": jnp.ones((4, 4))},
                         lorajax.LoraConfig(rank=2, targets="w",
                                            param_dtype="bfloat16"),
                         key=jax.random.key(0))
  assert adapter["w"].a.dtype == jnp.bfloat16
