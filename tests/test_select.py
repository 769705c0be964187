"""Target presets on other libraries' naming, selection by use, `summary`.

Param trees come from the libraries themselves where they are in the test
extra (flax linen/nnx, equinox, penzai, transformers' Mixtral state dict);
gemma and keras-hub trees are written out with their published names (the
source of each name is noted next to it).
"""

import dataclasses
import functools
import pathlib
import re

import _testing
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax

F32 = jnp.float32


def _sel(params, targets, **kw):
  """The sorted paths `targets` selects (by name only; nothing traced)."""
  config = lorajax.LoraConfig(targets=targets, **kw)
  return sorted(p for p, x in _flat(params) if config._explain(
      p, len(x.shape), x.dtype)[0])


def _flat(params):
  from lorajax._src.core import paths
  return paths.leaves_with_paths(params)


def _nested(flat: dict[str, tuple[int, ...]]):
  """`{"a/b/c": shape}` -> nested dict of float32 zeros."""
  out: dict = {}
  for path, shape in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jax.ShapeDtypeStruct(shape, F32)
  return out


def _unescape(targets):
  return sorted(re.sub(r"\\(.)", r"\1", t) for t in targets)


def _perturb(adapter, key):
  leaves, treedef = jax.tree.flatten(adapter)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([0.3 * jax.random.normal(k, x.shape, x.dtype)
                            for k, x in zip(keys, leaves)])


def _lora_equals_merged(fn, params, config, *args):
  """`init` + `lora` runs value and gradient equal to the merged path."""
  adapter = _perturb(lorajax.init(params, config, key=jax.random.key(0)),
                     jax.random.key(1))

  def loss(apply):
    return jax.jit(jax.value_and_grad(
        lambda ad: jnp.sum(jnp.sin(apply(ad)))))

  merged = loss(lambda ad: fn(lorajax.merge(params, ad), *args))
  v_m, g_m = merged(adapter)
  v_f, g_f = loss(lambda ad: lorajax.lora(fn, strict=True)(
      params, ad, *args))(adapter)
  zero = jax.tree.map(lambda n: dataclasses.replace(n, b=0 * n.b), adapter,
                      is_leaf=lambda x: isinstance(x, lorajax.LoraWeight))
  v_0, _ = merged(zero)
  assert abs(float(v_m) - float(v_0)) > 1e-3  # the adapter matters
  np.testing.assert_allclose(v_f, v_m, rtol=1e-4, atol=1e-4)
  for x, y in zip(jax.tree.leaves(g_m), jax.tree.leaves(g_f)):
    peak = float(np.abs(np.asarray(x)).max())
    assert peak > 0
    np.testing.assert_allclose(y, x, rtol=1e-3, atol=1e-4 * max(1.0, peak))


# -- naming families -----------------------------------------------------------

# google-deepmind/gemma, gemma/gm/nn/_modules.py and _transformer.py:
# `Embedder.input_embedding`, blocks `layer_{i}` with `attn` (`q_einsum`,
# `kv_einsum` or `qkv_einsum`, `attn_vec_einsum`: `_layers.Einsum` params `w`)
# and `mlp` (`FeedForward`: `gating_einsum` and `linear` directly in the
# `mlp` scope), norms `pre_attention_norm`/`pre_ffw_norm`/`final_norm`.
D, N, K, H, FF, V = 8, 2, 1, 4, 12, 16
GEMMA = {
    "embedder/input_embedding": (V, D),
    **{f"layer_{i}/{k}": s for i in range(2) for k, s in {
        "pre_attention_norm/scale": (D,),
        "attn/q_einsum/w": (N, D, H),
        "attn/kv_einsum/w": (2, K, D, H),
        "attn/attn_vec_einsum/w": (N, H, D),
        "pre_ffw_norm/scale": (D,),
        "mlp/gating_einsum": (2, D, FF),
        "mlp/linear": (FF, D),
    }.items()},
    "final_norm/scale": (D,),
}
GEMMA_LINEAR = {f"layer_{i}/{k}" for i in range(2) for k in (
    "attn/q_einsum/w", "attn/kv_einsum/w", "attn/attn_vec_einsum/w",
    "mlp/gating_einsum", "mlp/linear")}

# keras-team/keras-hub, keras_hub/src/models/mixtral/: backbone layers
# `token_embedding` (`ReversibleEmbedding`: `embeddings`, untied
# `reverse_embeddings`), `transformer_layer_{i}` with `self_attention`
# (`EinsumDense` `query`/`key`/`value`/`attention_output`: `kernel`) and the
# unnamed `MixtralSparseMoeBlock` (Keras names it `mixtral_sparse_moe_block`):
# router `sparse_feedforward_gate_dense/kernel` and the expert bank `experts`
# (`MixtralMoeExperts.add_weight` names `expert_feedforward_gate_dense`,
# `expert_feedforward_intermediate_dense`, `expert_feedforward_output_dense`,
# shapes (experts, d, ff) / (experts, ff, d)). Paths as Keras 3
# `variable.path`.
E = 3
_MOE = "transformer_layer_0/mixtral_sparse_moe_block"
KERAS_MIXTRAL = {
    "token_embedding/embeddings": (V, D),
    "token_embedding/reverse_embeddings": (D, V),
    "transformer_layer_0/self_attention_layernorm/scale": (D,),
    "transformer_layer_0/self_attention/query/kernel": (D, N, H),
    "transformer_layer_0/self_attention/key/kernel": (D, K, H),
    "transformer_layer_0/self_attention/value/kernel": (D, K, H),
    "transformer_layer_0/self_attention/attention_output/kernel": (N, H, D),
    f"{_MOE}/sparse_feedforward_gate_dense/kernel": (D, E),
    f"{_MOE}/experts/expert_feedforward_gate_dense": (E, D, FF),
    f"{_MOE}/experts/expert_feedforward_intermediate_dense": (E, D, FF),
    f"{_MOE}/experts/expert_feedforward_output_dense": (E, FF, D),
    "sequence_output_layernorm/scale": (D,),
}


def test_all_linear_on_gemma_names():
  params = _nested(GEMMA)
  assert set(_sel(params, "all-linear")) == GEMMA_LINEAR
  assert set(_sel(params, "attention")) == {
      p for p in GEMMA_LINEAR if "/attn/" in p}
  assert set(_sel(params, "mlp")) == {p for p in GEMMA_LINEAR if "/mlp/" in p}
  # Gemma 1/2 with as many kv heads as query heads: one `qkv_einsum`.
  qkv = _nested({"layer_0/attn/qkv_einsum/w": (3, N, D, H)})
  assert _sel(qkv, "attention") == ["layer_0/attn/qkv_einsum/w"]


def test_all_linear_on_keras_hub_mixtral_names():
  params = _nested(KERAS_MIXTRAL)
  got = set(_sel(params, "all-linear"))
  assert got == {p for p, s in KERAS_MIXTRAL.items() if len(s) >= 2
                 and not p.startswith("token_embedding")}
  assert {p for p in got if "expert_feedforward" in p} == {
      f"{_MOE}/experts/expert_feedforward_{n}_dense"
      for n in ("gate", "intermediate", "output")}
  assert set(_sel(params, "attention")) == {
      p for p in got if "/self_attention/" in p}
  assert set(_sel(params, "mlp")) == {p for p in got if _MOE in p}


def test_presets_on_a_transformers_mixtral_state_dict():
  # PEFT / Hugging Face naming, read off a real (tiny) MixtralForCausalLM.
  transformers = pytest.importorskip("transformers")
  cfg = transformers.MixtralConfig(
      vocab_size=32, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
      tie_word_embeddings=False)
  sd = transformers.MixtralForCausalLM(cfg).state_dict()
  params = _nested({k.replace(".", "/"): tuple(v.shape)
                    for k, v in sd.items()})
  all_linear = _sel(params, "all-linear")
  two_d = {p for p, x in _flat(params) if len(x.shape) >= 2}
  assert set(all_linear) == two_d - {"model/embed_tokens/weight",
                                     "lm_head/weight"}
  attn = _sel(params, "attention")
  assert attn and all("self_attn" in p for p in attn)
  mlp = _sel(params, "mlp")
  assert set(attn) | set(mlp) == set(all_linear)
  assert any(re.search(r"experts/\d+/", p) or "experts/" in p for p in mlp)


def test_all_linear_on_flax_equinox_and_nnx_trees():
  nn = pytest.importorskip("flax.linen")
  eqx = pytest.importorskip("equinox")
  nnx = pytest.importorskip("flax.nnx")

  class Lm(nn.Module):
    @nn.compact
    def __call__(self, ids):
      x = nn.Embed(V, D, name="embed")(ids)
      x = x + nn.MultiHeadDotProductAttention(2, name="attn")(x, x)
      x = x + nn.Dense(D, name="down")(nn.relu(nn.Dense(FF, name="up")(x)))
      return nn.Dense(V, name="lm_head")(x)

  ids = jnp.zeros((1, 3), jnp.int32)
  linen = jax.eval_shape(Lm().init, jax.random.key(0), ids)
  assert _sel(linen, "all-linear") == sorted(
      f"params/{m}/kernel" for m in ("attn/query", "attn/key", "attn/value",
                                     "attn/out", "up", "down"))
  assert len(_sel(linen, "attention")) == 4
  assert _sel(linen, "mlp") == ["params/down/kernel", "params/up/kernel"]

  k = jax.random.split(jax.random.key(0), 3)
  model = {"embedding": eqx.nn.Embedding(V, D, key=k[0]),
           "attn": eqx.nn.MultiheadAttention(2, D, key=k[1]),
           "head": eqx.nn.Linear(D, V, key=k[2])}
  params = eqx.filter(model, eqx.is_array)
  assert _sel(params, "all-linear") == sorted(
      f"attn/{m}/weight" for m in ("query_proj", "key_proj", "value_proj",
                                   "output_proj"))
  assert _sel(params, "attention") == _sel(params, "all-linear")

  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(D, FF, rngs=rngs)
      self.down = nnx.Linear(FF, D, rngs=rngs)

  _, state = nnx.split(Mlp(nnx.Rngs(0)))
  assert _sel(state, "all-linear") == ["down/kernel", "up/kernel"]


@functools.cache
def _penzai(tie: bool):
  fn, params, tokens = _testing.penzai_llamalike(tie)
  linear = sorted(
      f"transformer/block_{b}/{m}.weights/data_array" for b in range(2)
      for m in ("attention/query", "attention/key", "attention/value",
                "attention/output", "mlp/gating_linear", "mlp/value_linear",
                "mlp/out_linear"))
  return fn, params, tokens, linear


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_penzai_all_linear_and_select_linear_agree(tie):
  fn, params, tokens, linear = _penzai(tie)
  assert _sel(params, "all-linear") == linear
  assert _sel(params, "attention") == [p for p in linear if "attention" in p]
  assert _sel(params, "mlp") == [p for p in linear if "/mlp/" in p]
  assert _unescape(lorajax.select_linear(fn, params, tokens)) == linear


# -- selection by use ----------------------------------------------------------


def _gemma_fn(params, tokens):
  """Gemma's forward pass (the einsums of gemma/gm/nn/_modules.py), tied."""
  table = params["embedder"]["input_embedding"]
  x = table[(tokens,)] * jnp.sqrt(D).astype(F32)
  for i in range(2):
    p = params[f"layer_{i}"]
    h = x * p["pre_attention_norm"]["scale"]
    q = jnp.einsum("BTD,NDH->BTNH", h, p["attn"]["q_einsum"]["w"])
    k, v = jnp.einsum("BSD,CKDH->CBSKH", h, p["attn"]["kv_einsum"]["w"])
    logits = jnp.einsum("BTNH,BSKH->BTNS", q, jnp.repeat(k, N // K, 2))
    probs = jax.nn.softmax(logits, axis=-1)
    enc = jnp.einsum("BTNS,BSKH->BTNH", probs, jnp.repeat(v, N // K, 2))
    x = x + jnp.einsum("BTNH,NHD->BTD", enc, p["attn"]["attn_vec_einsum"]["w"])
    h = x * p["pre_ffw_norm"]["scale"]
    gate = jnp.einsum("...F,NFH->...NH", h, p["mlp"]["gating_einsum"])
    act = jax.nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
    x = x + jnp.einsum("...H,HF->...F", act, p["mlp"]["linear"])
  x = x * params["final_norm"]["scale"]
  return jnp.tanh(jnp.dot(x, table.T) / 30.0) * 30.0  # softcapped logits


def _gemma_params():
  rng = np.random.default_rng(3)

  def draw(s):
    if len(s.shape) == 1:  # norm scales around 1
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), F32)
    w = 0.5 * rng.standard_normal(s.shape) / np.sqrt(s.shape[-2])
    return jnp.asarray(w, F32)

  return jax.tree.map(draw, _nested(GEMMA))


def test_select_linear_on_gemma_excludes_the_tied_embedding():
  params = _gemma_params()
  tokens = jnp.array([[1, 5, 2], [7, 0, 3]])
  targets = lorajax.select_linear(_gemma_fn, params, tokens)
  assert _unescape(targets) == sorted(GEMMA_LINEAR)
  # Abstract params work as well.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          params)
  assert lorajax.select_linear(_gemma_fn, abstract, tokens) == targets


def test_gemma_init_and_lora_match_merged():
  params = _gemma_params()
  tokens = jnp.array([[1, 5, 2], [7, 0, 3]])
  targets = lorajax.select_linear(_gemma_fn, params, tokens)
  config = lorajax.LoraConfig(rank=2, alpha=4.0, targets=targets)
  axes = lorajax.sharding.infer_axes(_gemma_fn, params, tokens, config=config)
  config = dataclasses.replace(config, axes=axes)
  assert sorted(config.plan(params)) == sorted(GEMMA_LINEAR)
  # The preset picks the same weights (and takes the same axes).
  preset = dataclasses.replace(config, targets="all-linear")
  assert preset.plan(params) == config.plan(params)
  _lora_equals_merged(_gemma_fn, params, config, tokens)


def test_select_linear_on_flax_linen_and_equinox_models():
  nn = pytest.importorskip("flax.linen")
  eqx = pytest.importorskip("equinox")

  class Lm(nn.Module):
    tie: bool

    @nn.compact
    def __call__(self, ids):
      embed = nn.Embed(V, D, name="tok")
      x = embed(ids)
      x = x + nn.MultiHeadDotProductAttention(2, name="mha")(x, x)
      h = nn.Dense(FF, name="fc_a")(x)
      x = nn.LayerNorm(name="ln")(x + nn.Dense(D, name="fc_b")(nn.gelu(h)))
      if self.tie:
        return embed.attend(x)
      return nn.Dense(V, name="proj_vocab")(x)  # a head by use, not by name

  ids = jnp.array([[1, 2, 3, 4]])
  want = sorted(f"params/{m}/kernel" for m in (
      "mha/query", "mha/key", "mha/value", "mha/out", "fc_a", "fc_b"))
  for tie in (False, True):
    model = Lm(tie)
    params = jax.eval_shape(model.init, jax.random.key(0), ids)
    got = lorajax.select_linear(model.apply, params, ids)
    assert _unescape(got) == want, tie
    if not tie:  # The name-based preset cannot know this is the head.
      assert "params/proj_vocab/kernel" in _sel(params, "all-linear")

  k = jax.random.split(jax.random.key(1), 4)

  class Eqx(eqx.Module):
    emb: eqx.nn.Embedding
    mlp: eqx.nn.MLP
    out: eqx.nn.Linear

    def __call__(self, ids):
      x = jax.vmap(self.emb)(ids)
      x = x + jax.vmap(self.mlp)(x)
      return jax.vmap(self.out)(x)

  model = Eqx(eqx.nn.Embedding(V, D, key=k[0]),
              eqx.nn.MLP(D, D, FF, depth=2, key=k[1]),
              eqx.nn.Linear(D, V, key=k[2]))
  params, static = eqx.partition(model, eqx.is_array)
  fn = lambda p, ids: eqx.combine(p, static)(ids)  # noqa: E731
  got = lorajax.select_linear(fn, params, ids[0])
  assert _unescape(got) == [f"mlp/layers/{i}/weight" for i in range(3)]
  config = lorajax.LoraConfig(rank=2, alpha=2.0, targets=got)
  _lora_equals_merged(fn, params, config, ids[0])


def test_select_linear_on_lorajax_llama_matches_all_linear():
  from lorajax.models import llama

  for tie in (False, True):
    cfg = llama.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=12,
                            num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, max_position_embeddings=16,
                            tie_word_embeddings=tie)
    params = jax.eval_shape(lambda c=cfg: llama.init_params(
        c, key=jax.random.key(0)))
    ids = jnp.zeros((1, 4), jnp.int32)
    got = lorajax.select_linear(llama.LlamaModel(cfg).apply, params, ids)
    want = lorajax.LoraConfig(rank=1, targets="all-linear").plan(params)
    assert _unescape(got) == sorted(want) and len(want) == 14


def test_select_linear_raises_when_nothing_is_linear():
  params = {"table": jnp.ones((5, 3)), "w": jnp.ones((3, 3))}

  def fn(p, ids):  # a lookup and an elementwise use: no matmul
    return p["table"][ids] * p["w"][0]

  with pytest.raises(ValueError, match=r"found no weight(.|\n)*table: "
                     r"embedding table(.|\n)*w: not used as a matmul"):
    lorajax.select_linear(fn, params, jnp.array([0, 2]))


# -- summary -------------------------------------------------------------------


def test_summary_names_the_rule_and_what_was_left_out():
  fn, params, tokens, linear = _penzai(False)
  config = lorajax.LoraConfig(rank=2, targets="all-linear",
                              exclude=r".*block_1/attention/key.*")
  config = dataclasses.replace(config, axes=lorajax.sharding.infer_axes(
      fn, params, tokens, config=config))
  adapter = lorajax.init(params, config, key=jax.random.key(0))
  s = lorajax.summary(params, adapter, config=config)
  assert {w.path for w in s.weights} == set(linear) - {
      "transformer/block_1/attention/key.weights/data_array"}
  assert {w.rule for w in s.weights} == {"all-linear (penzai)"}
  why = {k.path: k.why for k in s.skipped}
  assert why == {
      "transformer/embedder.embeddings/data_array":
          "embedding table (part 'embedder.embeddings')",
      "transformer/lm_head.weights/data_array":
          "output head (part 'lm_head')",
      "transformer/block_1/attention/key.weights/data_array":
          "excluded by '.*block_1/attention/key.*'",
  }
  text = str(s)
  assert "all-linear (penzai)" in text and "output head" in text
  assert "not adapted: 3 weights" in text
  # Without `config` the table is the plain count, as before.
  assert lorajax.summary(params, adapter).skipped == ()
  assert "rule" not in str(lorajax.summary(params, adapter))
  with pytest.raises(TypeError,
                     match=r"`config` must be a lorajax\.LoraConfig"):
    lorajax.summary(params, adapter, config="all-linear")


def test_summary_merges_layer_rows_of_a_deep_model():
  params = {"layers": {str(i): {"q_proj": {"kernel": jnp.zeros((4, 4))},
                                "norm": {"scale": jnp.zeros(4)}}
                       for i in range(50)},
            "embed": {"embedding": jnp.zeros((9, 4))}}
  config = lorajax.LoraConfig(rank=1, targets="attention")
  s = lorajax.summary(params, lorajax.init(params, config,
                                           key=jax.random.key(0)),
                      config=config)
  text = str(s)
  assert "layers/{0-49}/q_proj/kernel" in text
  row = next(x for x in text.splitlines() if "{0-49}" in x)
  assert f"{50 * 8:,}" in row and f"{50 * 16:,}" in row  # counts summed
  assert "embed/embedding" in text and len(text.splitlines()) < 15


def test_docs_naming_table_is_generated():
  from lorajax._src.core import targets
  doc = (pathlib.Path(__file__).parent.parent / "docs" / "core.md").read_text()
  block = doc.split("<!-- naming-table")[1].split("<!-- /naming-table -->")[0]
  assert block.split("-->\n", 1)[1] == targets.family_table_markdown()


def test_select_linear_ragged_dot_experts_scan_and_conv():
  e, d, f = 3, 4, 6
  rng = np.random.default_rng(0)
  params = {
      "router": {"kernel": jnp.asarray(rng.standard_normal((d, e)), F32)},
      "experts": {"w_in": jnp.asarray(rng.standard_normal((e, d, f)), F32)},
      "blocks": {"kernel": jnp.asarray(rng.standard_normal((2, f, f)), F32)},
      "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 1, 1)), F32)},
  }

  def fn(p, x):  # x: (tokens, d), tokens sorted by expert
    gate = jax.nn.softmax(x @ p["router"]["kernel"])
    h = jax.lax.ragged_dot(x, p["experts"]["w_in"],
                           jnp.array([2, 1, 1], jnp.int32))
    h = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h,
                     p["blocks"]["kernel"])[0]
    sig = jax.lax.conv_general_dilated(
        h[None, :, :1].transpose(0, 2, 1), p["conv"]["kernel"], (1,),
        "SAME")
    return h + sig[0, 0][:, None] * jnp.sum(gate, -1, keepdims=True)

  x = jnp.asarray(rng.standard_normal((4, d)), F32)
  got = lorajax.select_linear(fn, params, x)
  assert _unescape(got) == ["blocks/kernel", "experts/w_in",
                            "router/kernel"]
  from lorajax._src.core.select import trace_uses
  assert trace_uses(fn, params, (x,), {})["conv/kernel"] == (
      False, "convolution kernel (name it in `targets` to adapt it)")
  config = lorajax.LoraConfig(rank=2, targets=got,
                              axes={r"experts/w_in|blocks/kernel": "sio"})
  adapter = lorajax.init(params, config, key=jax.random.key(0))
  rules = {w.path: w.rule for w in lorajax.summary(params, adapter,
                                                   config=config).weights}
  assert set(rules.values()) == {"listed path"}
