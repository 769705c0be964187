"""The fused, masked, chunked LM loss equals the loss of the full logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax import finetune as ft
from lorajax._src.models import llama as impl
from lorajax.models import llama

CFG = llama.LlamaConfig(
    vocab_size=300, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    tie_word_embeddings=True, rope_theta=1e4, rms_norm_eps=1e-5)


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, CFG.vocab_size, (3, 24)).astype(np.int32)
  att = np.ones_like(ids)
  att[2, 18:] = 0  # Right padding.
  lm = np.zeros(ids.shape, np.float32)
  lm[0, 12:] = 1.0
  lm[1, 3:7] = 1.0
  lm[1, 9] = 0.5  # A fractional weight.
  lm[2, 15:18] = 1.0
  return ids, att, lm


def _reference(logits, ids, lm):
  """Weighted next-token NLL from full logits, written out directly."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(nll * lm[:, 1:]), jnp.sum(lm[:, 1:])


def _adapter(params):
  """An adapter with perturbed (non-zero) B on every linear layer."""
  cfg = lorajax.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
  ad = lorajax.init(params, cfg, key=jax.random.key(1))
  keys = iter(jax.random.split(jax.random.key(2), 64))
  return jax.tree.map(
      lambda w: dataclasses.replace(
          w, b=0.1 * jax.random.normal(next(keys), w.b.shape)),
      ad, is_leaf=lambda x: isinstance(x, lorajax.LoraWeight))


@pytest.mark.parametrize(("chunk", "tied"), [(5, True), (1000, False)],
                         ids=["chunk5-tied", "chunk1000-untied"])
def test_value_and_grads_match_full_logits(chunk, tied):
  cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
  params = llama.init_params(cfg, key=jax.random.key(0))
  ids, att, lm = map(jnp.asarray, _batch())
  model = llama.LlamaModel(cfg)

  def ref(p):
    return _reference(model.apply(p, ids, att), ids, lm)

  def fused(p):
    return impl.loss_sums(p, cfg, ids, att, lm, chunk=chunk)

  rv, rn = ref(params)
  rg = jax.grad(lambda p: ref(p)[0])(params)
  fv, fn = jax.jit(fused)(params)
  fg = jax.jit(jax.grad(lambda p: fused(p)[0]))(params)
  np.testing.assert_allclose(fv, rv, rtol=1e-5)
  assert float(fn) == float(rn) == float(np.sum(np.asarray(lm)[:, 1:]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-6), fg, rg)


@pytest.mark.parametrize("n_loss", [69, 40, 27, 14, 2])
def test_head_widths_and_blocks(n_loss):
  # 3 x 23 = 69 positions with chunk 3: blocks of 12 positions, the head on
  # the first 3, 6 or 12 rows of a block. 69 loss positions fill every block;
  # 40 leave 4 in the fourth block (width 6), 27 leave 3 (width 3), 14 leave
  # 2 in the second block, 2 use one narrow matmul.
  params = llama.init_params(CFG, key=jax.random.key(3))
  ids, att, _ = map(jnp.asarray, _batch())
  rng = np.random.default_rng(n_loss)
  flat = np.zeros(3 * 23, np.float32)
  flat[rng.choice(3 * 23, n_loss, replace=False)] = rng.uniform(0.5, 1.5,
                                                                 n_loss)
  lm = np.zeros((3, 24), np.float32)
  lm[:, 1:] = flat.reshape(3, 23)  # Position t's weight is lm[:, t + 1].
  lm = jnp.asarray(lm)
  att = jnp.ones_like(att)
  model = llama.LlamaModel(CFG)
  blocks = impl._head_blocks(69, 3)
  assert [b[0] for b in blocks] == list(range(0, 69, 12))
  assert blocks[0][1] == [3, 6, 12] and blocks[-1][1] == [3, 6, 9]

  def ref(p):
    return _reference(model.apply(p, ids, att), ids, lm)[0]

  def fused(p):
    return impl.loss_sums(p, CFG, ids, att, lm, chunk=3)[0]

  np.testing.assert_allclose(jax.jit(fused)(params), ref(params), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-6),
      jax.jit(jax.grad(fused))(params), jax.grad(ref)(params))


def test_adapter_grads_factored_and_merged_match_full_logits():
  params = llama.init_params(CFG, key=jax.random.key(0))
  ad = _adapter(params)
  ids, att, lm = map(jnp.asarray, _batch())
  model = llama.LlamaModel(CFG)

  def ref(a):
    merged = lorajax.merge(params, a)
    return _reference(model.apply(merged, ids, att), ids, lm)[0]

  want_v, want_g = jax.value_and_grad(ref)(ad)
  for fn in (
      lambda a: lorajax.lora(model.loss_sums)(params, a, ids, att, lm)[0],
      lambda a: model.loss_sums(lorajax.merge(params, a), ids, att, lm)[0],
  ):
    v, g = jax.jit(jax.value_and_grad(fn))(ad)
    np.testing.assert_allclose(v, want_v, rtol=1e-5)
    assert float(jnp.abs(want_g["model"]["layers"]["0"]["mlp"]["up_proj"]
                         ["kernel"].a).max()) > 0
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        x, y, rtol=1e-4, atol=1e-6), g, want_g)


def test_no_loss_positions_give_zero():
  params = llama.init_params(CFG, key=jax.random.key(0))
  ids, att, _ = map(jnp.asarray, _batch())
  model = llama.LlamaModel(CFG)
  zero = jnp.zeros(ids.shape, jnp.float32)
  v, n = jax.jit(model.loss_sums)(params, ids, att, zero)
  assert float(v) == 0.0 and float(n) == 0.0
  g = jax.grad(lambda p: model.loss_sums(p, ids, att, zero)[0])(params)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))


def test_train_step_with_fused_loss_equals_logits_loss():
  """`lorajax.finetune`'s step uses the fused loss; a model without
  `loss_sums` goes through its logits: the same step either way."""
  params = llama.init_params(CFG, key=jax.random.key(0))
  model = llama.LlamaModel(CFG)

  class LogitsOnly:
    apply = staticmethod(model.apply)

  batch = tuple(jnp.asarray(x)[None] for x in _batch())
  tx = optax.adam(1e-2)
  for mode in ("factored",):
    outs = []
    for m in (model, LogitsOnly()):
      ad = _adapter(params)
      step = ft.make_train_step(m, tx, mode=mode, donate=False)
      outs.append(step.step(params, ad, step.init(ad), batch))
    (a1, _, m1), (a2, _, m2) = outs
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        x, y, rtol=1e-4, atol=1e-6), a1, a2)


def test_bad_inputs_name_the_argument():
  params = llama.init_params(CFG, key=jax.random.key(0))
  model = llama.LlamaModel(CFG)
  ids, att, lm = _batch()
  with pytest.raises(ValueError, match="`loss_mask` must have the shape"):
    model.loss_sums(params, ids, att, lm[:, :-1])
  with pytest.raises(ValueError, match="`attention_mask` must have the"):
    model.loss_sums(params, ids, att[:2], lm)
  with pytest.raises(ValueError, match=r"`input_ids` must have shape"):
    model.loss_sums(params, ids[0], None, lm[0])
  with pytest.raises(ValueError, match="`chunk` must be an integer >= 1"):
    impl.loss_sums(params, CFG, ids, att, lm, chunk=0)


def test_auto_merged_rule_counts_multiply_adds():
  # 576 x 576 at rank 16, 512 tokens: merged adds the dense weight gradient
  # 512*576*576 plus 2*16*576*576; factored 3*512*16*(576+576).
  assert not ft.auto_merged(576, 576, 16, 512)
  assert 3 * 512 * 16 * 1152 < 512 * 576 * 576 + 2 * 16 * 576 * 576
  # Rank near the width: merging does less work.
  assert ft.auto_merged(64, 64, 32, 512)
  assert 3 * 512 * 32 * 128 > 512 * 64 * 64 + 2 * 32 * 64 * 64


def test_auto_mode_mixes_and_equals_factored():
  """At rank 7 and 3 x 24 tokens the 32 x 32 attention weights merge and the
  32 x 64 MLP weights stay factored; the step equals the factored one."""
  assert ft.auto_merged(32, 32, 7, 72)
  assert not ft.auto_merged(32, 64, 7, 72)
  params = llama.init_params(CFG, key=jax.random.key(0))
  model = llama.LlamaModel(CFG)
  cfg = lorajax.LoraConfig(rank=7, alpha=8.0, targets="all-linear")
  batch = tuple(jnp.asarray(x)[None] for x in _batch())
  tx = optax.adam(1e-2)
  outs = []
  for mode in ("auto", "factored"):
    ad = lorajax.init(params, cfg, key=jax.random.key(1))
    ad = jax.tree.map(
        lambda w: dataclasses.replace(w, b=0.1 * jnp.ones_like(w.b)),
        ad, is_leaf=lambda x: isinstance(x, lorajax.LoraWeight))
    step = ft.make_train_step(model, tx, mode=mode, donate=False)
    outs.append(step.step(params, ad, step.init(ad), batch))
  (a1, _, m1), (a2, _, m2) = outs
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      x, y, rtol=1e-4, atol=1e-6), a1, a2)
