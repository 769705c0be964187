"""Core: init, merge, unmerge on linen params, NNX states and plain dicts."""

import functools

import _testing
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lorajax


def _perturb(adapter, key, scale=0.5):
  """Replaces every `a` and `b` with random values (b != 0)."""
  leaves, treedef = jax.tree.flatten(adapter)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([
      scale * jax.random.normal(k, x.shape, x.dtype)
      for k, x in zip(keys, leaves)
  ])


_nodes = _testing.nodes_by_path
_weights = _testing.leaves_by_path


def _dense_reference(w, node):
  """Independent numpy reference for W + scale * a @ b per axes string."""
  w = np.asarray(w, np.float64)
  a = np.asarray(node.a, np.float64)
  b = np.asarray(node.b, np.float64)
  axes = node.axes
  # Move axes to (stack..., in..., out...) order, flatten to a stack of
  # matrices, add the low-rank product per slice, then move back.
  order = ([i for i, c in enumerate(axes) if c == "s"]
           + [i for i, c in enumerate(axes) if c == "i"]
           + [i for i, c in enumerate(axes) if c == "o"])
  wt = np.transpose(w, order)
  n_s, n_i = axes.count("s"), axes.count("i")
  s_shape = wt.shape[:n_s]
  i_shape = wt.shape[n_s:n_s + n_i]
  o_shape = wt.shape[n_s + n_i:]
  s, d_in, d_out = int(np.prod(s_shape)), int(np.prod(i_shape)), int(
      np.prod(o_shape))
  wm = wt.reshape(s, d_in, d_out).copy()
  am = a.reshape(s, d_in, -1)
  bm = b.reshape(s, -1, d_out)
  for k in range(s):
    wm[k] += node.scale * am[k] @ bm[k]
  out = wm.reshape(wt.shape)
  return np.transpose(out, np.argsort(order))


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(16, name="up")(x)
    h = nn.gelu(h)
    return nn.Dense(8, name="down")(h) + x


class _NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(8, 16, rngs=rngs)
    self.down = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x))) + x


def _linen_params():
  return _Block().init(jax.random.key(0), jnp.ones((1, 8)))


def _nnx_state():
  _, state = nnx.split(_NNXBlock(nnx.Rngs(0)))
  return state


def _dict_params():
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  return {
      "embed": {"embedding": jax.random.normal(k1, (11, 8))},
      "layers": [
          {"w": jax.random.normal(k2, (8, 12)), "b": jnp.zeros(12)},
          {"w": jax.random.normal(k3, (12, 8)), "b": jnp.zeros(8)},
      ],
  }


TREES = {
    "linen": (_linen_params, ".*kernel", 2),
    "nnx": (_nnx_state, ".*kernel", 2),
    "dict": (_dict_params, "layers/.*/w", 2),
}


@pytest.fixture(params=sorted(TREES), ids=sorted(TREES))
def tree(request):
  make, targets, n = TREES[request.param]
  params = make()
  config = lorajax.LoraConfig(rank=3, alpha=6.0, targets=targets)
  adapter = lorajax.init(params, config, key=jax.random.key(2))
  assert len(_nodes(adapter)) == n
  return params, config, adapter


def test_zero_b_is_exact_identity(tree):
  params, _, adapter = tree
  merged = lorajax.merge(params, adapter)
  chex.assert_trees_all_equal(merged, params)


def test_perturbed_merge_matches_dense_reference(tree):
  params, _, adapter = tree
  adapter = _perturb(adapter, jax.random.key(3))
  merged = _weights(lorajax.merge(params, adapter))
  base = _weights(params)
  nodes = _nodes(adapter)
  for path, w in base.items():
    if path in nodes:
      ref = _dense_reference(w, nodes[path])
      assert not np.allclose(ref, w, atol=1e-3), path  # B != 0 matters.
      np.testing.assert_allclose(merged[path], ref, rtol=1e-5, atol=1e-5)
    else:
      np.testing.assert_array_equal(merged[path], w)


def test_merge_eager_equals_jit(tree):
  params, _, adapter = tree
  adapter = _perturb(adapter, jax.random.key(4))
  chex.assert_trees_all_close(
      lorajax.merge(params, adapter),
      jax.jit(lorajax.merge)(params, adapter), rtol=1e-6, atol=1e-6)


def test_unmerge_recovers_params(tree):
  params, _, adapter = tree
  adapter = _perturb(adapter, jax.random.key(5))
  back = lorajax.unmerge(lorajax.merge(params, adapter), adapter)
  chex.assert_trees_all_close(back, params, rtol=1e-5, atol=1e-5)


def test_init_follows_lora_paper():
  params = {"w": jnp.zeros((400, 300))}
  adapter = lorajax.init(params, lorajax.LoraConfig(rank=16, alpha=8.0,
                                                    targets="w"),
                         key=jax.random.key(0))
  node = adapter["w"]
  assert node.a.shape == (400, 16) and node.b.shape == (16, 300)
  assert node.scale == pytest.approx(0.5)
  bound = 1 / np.sqrt(400)
  a = np.asarray(node.a)
  assert a.min() >= -bound and a.max() <= bound
  assert a.min() < -0.9 * bound and a.max() > 0.9 * bound  # fills the range
  np.testing.assert_array_equal(node.b, 0)
  rs = lorajax.init(params, lorajax.LoraConfig(rank=16, alpha=8.0, targets="w",
                                               use_rslora=True),
                    key=jax.random.key(0))
  assert rs["w"].scale == pytest.approx(8.0 / 4.0)


def test_init_is_keyed_per_path():
  params = _dict_params()
  one = lorajax.init(params, lorajax.LoraConfig(rank=2, targets="layers/0/w"),
                     key=jax.random.key(7))
  both = lorajax.init(params, lorajax.LoraConfig(rank=2, targets="layers/./w"),
                      key=jax.random.key(7))
  np.testing.assert_array_equal(one["layers"][0]["w"].a,
                                both["layers"][0]["w"].a)
  assert not np.allclose(both["layers"][0]["w"].a[:8],
                         both["layers"][1]["w"].a[:8])


def test_gaussian_init():
  params = {"w": jnp.zeros((512, 256))}
  node = lorajax.init(params, lorajax.LoraConfig(rank=4, targets="w",
                                                 init="gaussian"),
                      key=jax.random.key(0))["w"]
  assert float(np.std(node.a)) == pytest.approx(1 / 4, rel=0.05)
  np.testing.assert_array_equal(node.b, 0)


def test_at_init_only_b_gets_a_gradient(tree):
  params, _, adapter = tree
  flat_w = _weights(params)
  x = jax.random.normal(jax.random.key(9), (4, 8))

  def loss(adapter):
    merged = lorajax.merge(params, adapter)
    return sum(jnp.sum(jnp.sin(w)) for w in jax.tree.leaves(merged)) + sum(
        jnp.sum((x @ w[:8, :8]) ** 2) for w in jax.tree.leaves(merged)
        if w.ndim == 2 and w.shape[0] >= 8 and w.shape[1] >= 8)

  grads = jax.grad(loss)(adapter)
  for path, g in _nodes(grads).items():
    np.testing.assert_array_equal(g.a, 0, err_msg=path)
    assert np.abs(np.asarray(g.b)).max() > 0, path
  assert flat_w  # params untouched by construction


def test_merge_gradient_matches_dense_chain_rule():
  params = {"w": jax.random.normal(jax.random.key(0), (6, 5))}
  cfg = lorajax.LoraConfig(rank=2, alpha=3.0, targets="w")
  adapter = _perturb(lorajax.init(params, cfg, key=jax.random.key(1)),
                     jax.random.key(2))
  x = jax.random.normal(jax.random.key(3), (7, 6))
  loss = lambda ad: jnp.sum(jnp.tanh(x @ lorajax.merge(params, ad)["w"]))  # noqa: E731
  g = jax.grad(loss)(adapter)["w"]
  node = adapter["w"]
  w_eff = params["w"] + node.scale * node.a @ node.b
  dw = x.T @ (1 - jnp.tanh(x @ w_eff) ** 2)  # dL/dW'
  np.testing.assert_allclose(g.a, node.scale * dw @ node.b.T, rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(g.b, node.scale * node.a.T @ dw, rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize(
    "shape,axes",
    [((8, 3, 4), "ioo"), ((3, 4, 8), "iio"), ((5, 8, 6), "sio"),
     ((6, 5, 8), "osi"), ((2, 3, 6, 4, 2), "ssioo")],
    ids=["ioo", "iio", "sio", "osi", "ssioo"])
def test_multi_axis_and_stacked_weights(shape, axes):
  params = {"blk": {"kernel": jax.random.normal(jax.random.key(0), shape)}}
  cfg = lorajax.LoraConfig(rank=2, alpha=4.0, targets=".*kernel",
                           axes={".*kernel": axes})
  adapter = lorajax.init(params, cfg, key=jax.random.key(1))
  node = adapter["blk"]["kernel"]
  dims = dict(zip(range(len(shape)), shape))
  pick = lambda c: tuple(dims[i] for i, x in enumerate(axes) if x == c)  # noqa: E731
  assert node.a.shape == (*pick("s"), *pick("i"), 2)
  assert node.b.shape == (*pick("s"), 2, *pick("o"))
  assert node.weight_shape == shape
  adapter = _perturb(adapter, jax.random.key(2))
  node = adapter["blk"]["kernel"]
  merged = lorajax.merge(params, adapter)["blk"]["kernel"]
  np.testing.assert_allclose(
      merged, _dense_reference(params["blk"]["kernel"], node),
      rtol=1e-5, atol=1e-5)


def test_bf16_weights_merge_in_float32_and_keep_dtype():
  w = jax.random.normal(jax.random.key(0), (64, 32)).astype(jnp.bfloat16)
  params = {"w": w}
  adapter = _perturb(lorajax.init(params, lorajax.LoraConfig(rank=4,
                                                             targets="w"),
                                  key=jax.random.key(1)), jax.random.key(2),
                     scale=0.01)
  merged = lorajax.merge(params, adapter)["w"]
  assert merged.dtype == jnp.bfloat16
  ref = _dense_reference(w.astype(jnp.float32), adapter["w"])
  np.testing.assert_allclose(np.asarray(merged, np.float32), ref, rtol=1e-2,
                             atol=1e-2)


def test_eval_shape_init_on_abstract_params():
  abstract = {"a": {"kernel": jax.ShapeDtypeStruct((1024, 4096),
                                                   jnp.bfloat16)},
              "b": {"kernel": jax.ShapeDtypeStruct((4096, 1024),
                                                   jnp.bfloat16)}}
  cfg = lorajax.LoraConfig(rank=8)
  out = jax.eval_shape(functools.partial(lorajax.init, config=cfg,
                                         key=jax.random.key(0)), abstract)
  assert out["a"]["kernel"].a == jax.ShapeDtypeStruct((1024, 8), jnp.float32)
  assert out["b"]["kernel"].b == jax.ShapeDtypeStruct((8, 1024), jnp.float32)
  assert out["a"]["kernel"].scale == 4.0
  # The same abstract params also work eagerly (only shapes are read).
  concrete = lorajax.init(abstract, cfg, key=jax.random.key(0))
  assert concrete["b"]["kernel"].a.shape == (4096, 8)


def test_merge_does_not_retrace():
  params = _dict_params()
  adapter = lorajax.init(params, lorajax.LoraConfig(rank=2,
                                                    targets="layers/./w"),
                         key=jax.random.key(0))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fwd(params, adapter, x):
    merged = lorajax.merge(params, adapter)
    return x @ merged["layers"][0]["w"] @ merged["layers"][1]["w"]

  x = jnp.ones((2, 8))
  fwd(params, adapter, x)
  fwd(params, _perturb(adapter, jax.random.key(1)), x + 1)


def test_summary_counts():
  params = _dict_params()
  adapter = lorajax.init(params, lorajax.LoraConfig(rank=2,
                                                    targets="layers/./w"),
                         key=jax.random.key(0))
  s = lorajax.summary(params, adapter)
  assert s.trainable == (8 * 2 + 2 * 12) + (12 * 2 + 2 * 8)
  assert s.trainable_bytes == 4 * s.trainable
  assert s.frozen == 11 * 8 + 8 * 12 + 12 + 12 * 8 + 8
  assert [w.path for w in s.weights] == ["layers/0/w", "layers/1/w"]
  text = str(s)
  assert "layers/0/w" in text and f"{s.trainable:,}" in text


def test_optimizer_state_covers_only_the_adapter():
  params = _dict_params()
  adapter = lorajax.init(params, lorajax.LoraConfig(rank=2,
                                                    targets="layers/./w"),
                         key=jax.random.key(0))
  state = optax.adam(1e-3).init(adapter)
  n_state = sum(x.size for x in jax.tree.leaves(state))
  n_adapter = sum(x.size for x in jax.tree.leaves(adapter))
  assert n_state == 2 * n_adapter + 1  # mu, nu and a step count.


def test_lora_plus_scales_b_updates():
  params = {"w": jnp.ones((6, 4))}
  adapter = _perturb(lorajax.init(params, lorajax.LoraConfig(rank=2,
                                                             targets="w"),
                                  key=jax.random.key(0)), jax.random.key(1))
  grads = _perturb(adapter, jax.random.key(2))
  tx = lorajax.optim.lora_plus(0.1, ratio=8.0, optimizer=optax.sgd)
  updates, _ = tx.update(grads, tx.init(adapter), adapter)
  np.testing.assert_allclose(updates["w"].a, -0.1 * grads["w"].a, rtol=1e-6)
  np.testing.assert_allclose(updates["w"].b, -0.8 * grads["w"].b, rtol=1e-6)
  with pytest.raises(ValueError, match="`ratio` must be > 0"):
    lorajax.optim.lora_plus(0.1, ratio=0.0)


def test_lora_plus_with_schedule():
  params = {"w": jnp.ones((6, 4))}
  adapter = lorajax.init(params, lorajax.LoraConfig(rank=2, targets="w"),
                         key=jax.random.key(0))
  grads = _perturb(adapter, jax.random.key(2))
  sched = optax.linear_schedule(1.0, 0.0, 10)
  tx = lorajax.optim.lora_plus(sched, ratio=2.0, optimizer=optax.sgd)
  updates, _ = tx.update(grads, tx.init(adapter), adapter)
  np.testing.assert_allclose(updates["w"].b, -2.0 * grads["w"].b, rtol=1e-6)


def test_decay_mask_selects_adapter_matrices():
  params = {"w": jnp.ones((6, 4))}
  adapter = lorajax.init(params, lorajax.LoraConfig(rank=2, targets="w"),
                         key=jax.random.key(0))
  trainable = {"lora": adapter, "norm": jnp.ones(4)}
  mask = lorajax.optim.decay_mask(trainable)
  assert mask["lora"]["w"].a is True and mask["lora"]["w"].b is True
  assert mask["norm"] is False
  tx = optax.adamw(0.1, weight_decay=0.5, mask=lorajax.optim.decay_mask)
  zero = jax.tree.map(jnp.zeros_like, trainable)
  upd, _ = tx.update(zero, tx.init(trainable), trainable)
  np.testing.assert_array_equal(upd["norm"], 0)  # no decay on the norm
  np.testing.assert_allclose(upd["lora"]["w"].a, -0.05 * adapter["w"].a,
                             rtol=1e-6)


class _TinyTransformer(nn.Module):
  vocab: int = 32
  d: int = 32

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(self.vocab, self.d, name="embed")(ids)
    for i in range(2):
      h = nn.LayerNorm(name=f"ln_{i}")(x)
      q = nn.Dense(self.d, name=f"block_{i}_q")(h)
      k = nn.Dense(self.d, name=f"block_{i}_k")(h)
      v = nn.Dense(self.d, name=f"block_{i}_v")(h)
      att = jnp.einsum("btd,bsd->bts", q, k) / jnp.sqrt(self.d)
      mask = jnp.tril(jnp.ones((ids.shape[1], ids.shape[1]), bool))
      att = jnp.where(mask, att, -1e9)
      x = x + nn.Dense(self.d, name=f"block_{i}_o")(
          jax.nn.softmax(att) @ v)
      h = nn.LayerNorm(name=f"ln2_{i}")(x)
      x = x + nn.Dense(self.d, name=f"block_{i}_down")(
          nn.gelu(nn.Dense(2 * self.d, name=f"block_{i}_up")(h)))
    return nn.Dense(self.vocab, name="lm_head")(x)


def test_toy_finetune_lowers_loss_and_keeps_params_frozen():
  model = _TinyTransformer()
  ids = jax.random.randint(jax.random.key(0), (8, 16), 0, 32)
  params = model.init(jax.random.key(1), ids)
  frozen_copy = jax.tree.map(np.array, params)
  # A task the random base model cannot do: predict (token + 1) mod vocab.
  targets = (ids + 1) % 32
  cfg = lorajax.LoraConfig(rank=8, alpha=16.0)
  adapter = lorajax.init(params, cfg, key=jax.random.key(2))
  adapted = set(_nodes(adapter))
  assert "params/lm_head/kernel" not in adapted
  assert "params/embed/embedding" not in adapted
  assert len(adapted) == 12
  tx = optax.adam(1e-2)
  opt_state = tx.init(adapter)

  def loss_fn(adapter, params):
    logits = model.apply(lorajax.merge(params, adapter), ids)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()

  @jax.jit
  def step(adapter, opt_state, params):
    loss, grads = jax.value_and_grad(loss_fn)(adapter, params)
    updates, opt_state = tx.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss

  losses = []
  for _ in range(150):
    adapter, opt_state, loss = step(adapter, opt_state, params)
    losses.append(float(loss))
  assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
  chex.assert_trees_all_equal(jax.tree.map(np.array, params), frozen_copy)


def test_summary_rejects_an_adapter_for_other_params():
  params = _dict_params()
  adapter = lorajax.init(params, lorajax.LoraConfig(rank=2,
                                                    targets="layers/./w"),
                         key=jax.random.key(0))
  other = {"embed": params["embed"], "layers": params["layers"][:1]}
  with pytest.raises(ValueError, match="structure does not fit"):
    lorajax.summary(other, adapter)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_lora_weight_derives_scale_from_alpha_and_flag(rslora):
  """`scale` is derived (alpha / r, or alpha / sqrt(r) with rsLoRA, Hu et al.
  2021 / Kalajdzievski 2023); only `a` and `b` are pytree leaves."""
  params = {"w": jnp.ones((8, 6))}
  config = lorajax.LoraConfig(rank=4, alpha=6.0, targets="w",
                              use_rslora=rslora)
  node = lorajax.init(params, config, key=jax.random.key(0))["w"]
  assert node.alpha == 6.0 and node.rslora is rslora
  assert node.scale == (6.0 / 2.0 if rslora else 6.0 / 4.0)
  assert len(jax.tree.leaves(node)) == 2
  moved = jax.tree.map(lambda x: x + 1, node)
  assert moved.scale == node.scale and moved.rslora is rslora
  with pytest.raises(TypeError, match=r"needs `alpha`"):
    lorajax.LoraWeight(a=node.a, b=node.b)
  with pytest.warns(DeprecationWarning, match=r"LoraWeight\(scale=\.\.\.\)"):
    old = lorajax.LoraWeight(a=node.a, b=node.b, scale=0.75)
  assert old.alpha == 3.0 and old.scale == 0.75
