"""lorajax.lora on model code nobody on this project wrote.

Tiny random configurations of layers from flax linen, flax nnx, equinox and
penzai: `lorajax.lora(fn, strict=True)` (nothing may fall back) under `jit`
must equal `fn(lorajax.merge(params, adapter), ...)` in value and in adapter
gradient, with a perturbed (non-zero) `b` so the adapter matters.
"""

import dataclasses

import _testing
import jax
import jax.numpy as jnp
import pytest

import lorajax

RTOL, ATOL = 3e-4, 3e-5


def _adapter(fn, params, args, config):
  """Init with axes inferred from `fn` for weights with more than 2 axes."""
  try:
    axes = lorajax.infer_axes(fn, params, *args, config=config)
  except ValueError:
    axes = {}
  if axes:
    extra = dict(config.axes or ())
    config = dataclasses.replace(config, axes={**extra, **axes})
  adapter = lorajax.init(params, config, key=jax.random.key(0))
  return _testing.perturb(adapter, jax.random.key(1), 0.2), axes


def _check(fn, params, adapter, *args, want_fallback=None):
  n = len([x for x in jax.tree.leaves(
      adapter, is_leaf=lambda x: isinstance(x, lorajax.LoraWeight))
           if isinstance(x, lorajax.LoraWeight)])
  assert n >= 2, "the test must adapt several weights"
  # strict=True: nothing may fall back (unless a fallback is expected).
  return _testing.check_matches_merged(
      fn, params, adapter, *args, strict=want_fallback is None,
      want_fallback=want_fallback, rtol=RTOL, atol=ATOL, grad_atol=1e-4,
      min_effect=1e-3)


# -- flax linen ----------------------------------------------------------------


def test_flax_linen_attention_einsum_scan_remat():
  nn = pytest.importorskip("flax.linen")

  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8,
                                          name="attn")(x, x)
      x = x + h
      up = nn.Einsum((8, 3, 4), "btd,dhk->bthk", name="up")(x)
      return x + nn.Dense(8, name="down")(jax.nn.gelu(up).reshape(
          *x.shape[:2], 12)), None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      stack = nn.scan(nn.remat(Layer), variable_axes={"params": 0},
                      split_rngs={"params": True}, length=2)
      return stack(name="layers")(x, None)[0]

  model = Model()
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  params = model.init(jax.random.key(1), x)
  config = lorajax.LoraConfig(rank=2, alpha=2.0, targets=".*kernel")
  adapter, axes = _adapter(model.apply, params, (x,), config)
  assert axes["params/layers/attn/query/kernel"] == "sioo"
  assert axes["params/layers/attn/out/kernel"] == "siio"
  assert axes["params/layers/up/kernel"] == "sioo"
  assert axes["params/layers/down/kernel"] == "sio"
  _check(model.apply, params, adapter, x)


def test_flax_fp8_dot_general_runs_on_the_merged_weight():
  nn = pytest.importorskip("flax.linen")
  fp8_ops = pytest.importorskip("flax.linen.fp8_ops")

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      dot = fp8_ops.Fp8DirectDotGeneralOp
      h = nn.Dense(8, dot_general_cls=dot, name="up")(x)
      return nn.Dense(5, dot_general_cls=dot, name="down")(jnp.tanh(h))

  model = Model()
  x = jax.random.normal(jax.random.key(0), (4, 6))
  variables = model.init(jax.random.key(1), x)
  config = lorajax.LoraConfig(rank=2, alpha=2.0, targets=".*kernel")
  adapter, _ = _adapter(model.apply, variables, (x,), config)
  # FP8 quantization (scaling, fp8 casts) runs inside flax's custom_vjp
  # rules, so each kernel takes the merged weight there: the value is the
  # merged path's, and so is the gradient of flax's own backward rule.
  msgs = _check(model.apply, variables, adapter, x,
                want_fallback="custom_vjp_call of quantized_dot")
  assert any("'params/up/kernel'" in m for m in msgs)
  assert any("'params/down/kernel'" in m for m in msgs)


# -- flax nnx ------------------------------------------------------------------


def test_flax_nnx_attention_linear_einsum():
  nnx = pytest.importorskip("flax.nnx")

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8,
                                         qkv_features=8, decode=False,
                                         rngs=rngs)
      self.proj = nnx.Einsum("btd,dhk->bthk", (8, 2, 5), rngs=rngs)
      self.out = nnx.Linear(10, 8, rngs=rngs)

    def __call__(self, x):
      x = x + self.attn(x)
      h = jax.nn.relu(self.proj(x)).reshape(*x.shape[:2], 10)
      return x + self.out(h)

  graphdef, state = nnx.split(Model(nnx.Rngs(0)))
  fn = lambda state, x: nnx.merge(graphdef, state)(x)  # noqa: E731
  x = jax.random.normal(jax.random.key(2), (2, 4, 8))
  config = lorajax.LoraConfig(rank=2, alpha=2.0, targets=".*kernel")
  adapter, axes = _adapter(fn, state, (x,), config)
  assert axes["attn/query/kernel"] == "ioo" and axes["proj/kernel"] == "ioo"
  assert axes["attn/out/kernel"] == "iio"
  _check(fn, state, adapter, x)


# -- equinox -------------------------------------------------------------------


def test_equinox_embedding_attention_linear_mlp():
  eqx = pytest.importorskip("equinox")
  k = jax.random.split(jax.random.key(0), 5)

  class Model(eqx.Module):
    embed: eqx.nn.Embedding
    attn: eqx.nn.MultiheadAttention
    mlp: eqx.nn.MLP
    head: eqx.nn.Linear

    def __call__(self, tokens):  # tokens: (seq,)
      # `Embedding` indexes `weight[i]` one token at a time: under `vmap`
      # a gather with a start index for each axis of the table.
      x = jax.vmap(self.embed)(tokens)
      x = x + self.attn(x, x, x)
      x = x + jax.vmap(self.mlp)(x)
      return jax.vmap(self.head)(x)

  model = Model(eqx.nn.Embedding(11, 8, key=k[4]),
                eqx.nn.MultiheadAttention(2, 8, key=k[0]),
                eqx.nn.MLP(8, 8, 16, depth=2, key=k[1]),
                eqx.nn.Linear(8, 3, key=k[2]))
  params, static = eqx.partition(model, eqx.is_array)
  fn = lambda p, x: eqx.combine(p, static)(x)  # noqa: E731
  tokens = jnp.array([3, 0, 10, 3, 7])
  # Equinox stores Linear weights as (out, in); the embedding table is
  # (vocab, d): "io" (the default).
  config = lorajax.LoraConfig(rank=2, alpha=2.0, targets=".*weight",
                              axes={"(attn|mlp|head)/.*weight": "oi"})
  adapter, _ = _adapter(fn, params, (tokens,), config)
  assert lorajax.is_lora(adapter.embed.weight)
  _check(fn, params, adapter, tokens)


# -- penzai --------------------------------------------------------------------


def test_penzai_llamalike_transformer():
  fn, params, tokens = _testing.penzai_llamalike(tie=True)
  # The tied embedding table is adapted too: penzai looks tokens up on its
  # named `vocabulary` axis and uses the same table as the logits head.
  config = lorajax.LoraConfig(
      rank=2, alpha=2.0,
      targets=r".*/(query|key|value|output|.*linear)\.weights/.*"
      r"|.*/embedder\.embeddings/.*")
  adapter, axes = _adapter(fn, params, (tokens,), config)
  assert len(axes) >= 8
  assert lorajax.is_lora(adapter["transformer/embedder.embeddings"].data_array)
  _check(fn, params, adapter, tokens)
