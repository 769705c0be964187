"""LoRA on meshes with Explicit axes (JAX's `jax.make_mesh` default) and on
Auto meshes: merge, the factored path, init_sharded, adapter_shardings, the
train step and CheckpointManager, on the (8,), (2, 4) and (2, 2, 2) meshes of
8 simulated CPU devices. Every result is checked against an unsharded
single-device reference computed with plain numpy/jnp math."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lorajax

V, D, F, L, B = 32, 16, 24, 2, 8
MESHES = {
    "8": ((8,), ("fsdp",)),
    "2x4": ((2, 4), ("data", "tensor")),
    "2x2x2": ((2, 2, 2), ("data", "fsdp", "tensor")),
}
KINDS = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
CONFIG = lorajax.LoraConfig(
    rank=4, alpha=8.0, targets=r"(embed/embedding|layers/.*|head/kernel)",
    axes={"layers/.*": "sio"})


def make_mesh(name, kind):
  shape, names = MESHES[name]
  return jax.make_mesh(shape, names, axis_types=(KINDS[kind],) * len(shape))


def _ax(mesh, name):
  return name if name in mesh.axis_names else None


def batch_axes(mesh):
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  return axes if len(axes) > 1 else axes[0]


def param_specs(mesh):
  """FSDP on `fsdp`, Megatron-style tensor parallelism on `tensor`."""
  fs, tp = _ax(mesh, "fsdp"), _ax(mesh, "tensor")
  return {
      "embed": {"embedding": P(None, fs)},
      "layers": {"up": {"kernel": P(None, fs, tp)},
                 "down": {"kernel": P(None, tp, fs)}},
      "head": {"kernel": P(fs, tp)},
  }


def init_params(key):
  ks = jax.random.split(key, 4)
  def n(k, s):
    return jax.random.normal(k, s) / np.sqrt(s[-2])

  return {
      "embed": {"embedding": jax.random.normal(ks[0], (V, D))},
      "layers": {"up": {"kernel": n(ks[1], (L, D, F))},
                 "down": {"kernel": n(ks[2], (L, F, D))}},
      "head": {"kernel": n(ks[3], (D, V))},
  }


def forward(params, ids, mesh=None):
  """A small scanned model, written for Explicit meshes as a user would:
  weights are all-gathered over `fsdp` (`reshard`) before use and matmuls
  whose contracted axis is sharded name their output sharding. With
  `mesh=None` (or an Auto mesh) it is plain jnp."""
  explicit = mesh is not None and mesh.axis_types[0] == AxisType.Explicit

  def gather(w):
    if not explicit:
      return w
    spec = [None if e == "fsdp" else e for e in
            tuple(jax.typeof(w).sharding.spec)]
    return jax.sharding.reshard(w, NamedSharding(mesh, P(*spec)))

  def out(*spec):
    return NamedSharding(mesh, P(*spec)) if explicit else None

  bt = batch_axes(mesh) if mesh is not None else None
  tp = _ax(mesh, "tensor") if mesh is not None else None
  emb = gather(params["embed"]["embedding"])
  h = jnp.asarray(emb).at[ids].get(out_sharding=out(bt, None))

  def layer(h, w):
    u = jnp.einsum("bd,df->bf", h, gather(w["up"]["kernel"]),
                   out_sharding=out(bt, tp))
    y = jnp.einsum("bf,fd->bd", jnp.tanh(u), gather(w["down"]["kernel"]),
                   out_sharding=out(bt, None))
    return h + y, None

  h, _ = jax.lax.scan(layer, h, params["layers"])
  return jnp.einsum("bd,dv->bv", h, gather(params["head"]["kernel"]),
                    out_sharding=out(bt, tp))


def loss_fn(params, ids, y, mesh=None):
  return jnp.mean((forward(params, ids, mesh) - y) ** 2)


def dense_merge(params, adapter):
  """The reference merge, in numpy: W + scale * a @ b per weight."""
  def one(node, w):
    w = np.asarray(w, np.float64)
    if node is None:
      return w
    a, b = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
    return w + node.scale * np.matmul(a, b)
  return jax.tree.map(one, adapter, params, is_leaf=lorajax.is_lora)


def perturbed(adapter, seed=3):
  leaves, treedef = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      np.asarray(x + 0.1 * jax.random.normal(k, x.shape))
      for x, k in zip(leaves, keys)])


def host_data(step=0):
  rng = np.random.default_rng(step)
  return (rng.integers(0, V, (B,)).astype(np.int32),
          rng.normal(size=(B, V)).astype(np.float32))


@pytest.fixture(scope="module")
def host():
  params = jax.tree.map(np.asarray, init_params(jax.random.key(0)))
  adapter = perturbed(lorajax.init(params, CONFIG, key=jax.random.key(1)))
  return params, adapter


def shard_all(mesh, params, adapter):
  specs = param_specs(mesh)
  psh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                     is_leaf=lambda x: isinstance(x, P))
  ash = lorajax.adapter_shardings(psh, adapter)
  return (psh, ash, jax.device_put(params, psh),
          jax.device_put(jax.tree.map(np.asarray, adapter), ash))


def data_shardings(mesh):
  bt = batch_axes(mesh)
  return (NamedSharding(mesh, P(bt)),
          NamedSharding(mesh, P(bt, _ax(mesh, "tensor"))))


# Explicit on all three meshes; Auto on one here (tests/test_sharding.py and
# tests/test_checkpoint.py run Auto meshes throughout).
CASES = [("8", "explicit"), ("2x4", "explicit"), ("2x2x2", "explicit"),
         ("2x2x2", "auto")]
IDS = [f"{m}-{k}" for m, k in CASES]
OPT = optax.adam(1e-2)


@jax.jit
def reference_value_and_grad(params, adapter, ids, y):
  """Unsharded: the model on a dense jnp merge (checked against numpy)."""
  return jax.value_and_grad(
      lambda a: loss_fn(lorajax.merge(params, a), ids, y))(adapter)


@pytest.mark.parametrize("mesh_name,kind", CASES, ids=IDS)
def test_merge_lora_init_and_train_step_match_the_reference(
    mesh_name, kind, host):
  params_h, adapter_h = host
  mesh = make_mesh(mesh_name, kind)
  psh, ash, params, adapter = shard_all(mesh, params_h, adapter_h)
  ids_sh, y_sh = data_shardings(mesh)
  ids_h, y_h = host_data()
  ids, y = jax.device_put(ids_h, ids_sh), jax.device_put(y_h, y_sh)

  # The reference loss from numpy-merged weights (float64 merge).
  merged_h = jax.tree.map(lambda w: w.astype(np.float32),
                          dense_merge(params_h, adapter_h))
  want = float(loss_fn(merged_h, ids_h, y_h))
  ref_loss, want_g = reference_value_and_grad(params_h, adapter_h, ids_h, y_h)
  np.testing.assert_allclose(float(ref_loss), want, rtol=2e-5)

  def merged_loss(p, a, i, t):
    return loss_fn(lorajax.merge(p, a), i, t, mesh)

  def factored_loss(p, a, i, t):
    return jnp.mean(
        (lorajax.lora(forward, strict=True)(p, a, i, mesh) - t) ** 2)

  for fn in (merged_loss, factored_loss):
    loss, g = jax.jit(jax.value_and_grad(fn, argnums=1))(
        params, adapter, ids, y)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    for x, r in zip(jax.tree.leaves(g), jax.tree.leaves(want_g)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(r), rtol=2e-4,
                                 atol=2e-5)
    # Gradients come back sharded like the adapter.
    for x, s in zip(jax.tree.leaves(g), jax.tree.leaves(ash)):
      assert x.sharding.is_equivalent_to(s, x.ndim)

  # Merge keeps every weight's sharding, even for an adapter that is not
  # sharded like the weights (here replicated on the mesh).
  repl = jax.device_put(jax.tree.map(np.asarray, adapter_h),
                        NamedSharding(mesh, P()))
  merged = jax.jit(lorajax.merge)(params, repl)
  for x, s, r in zip(jax.tree.leaves(merged), jax.tree.leaves(psh),
                     jax.tree.leaves(merged_h)):
    assert x.sharding.is_equivalent_to(s, x.ndim)
    np.testing.assert_allclose(np.asarray(x), r, rtol=1e-5, atol=1e-5)

  # init_sharded: each matrix born with its derived sharding, same values.
  fresh = lorajax.init_sharded(params, CONFIG, key=jax.random.key(1),
                               param_shardings=psh)
  ref = lorajax.init(params_h, CONFIG, key=jax.random.key(1))
  for x, r, s in zip(jax.tree.leaves(fresh), jax.tree.leaves(ref),
                     jax.tree.leaves(ash)):
    assert x.sharding.is_equivalent_to(s, x.ndim)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(r))
  up = ash["layers"]["up"]["kernel"]
  fs, tp = _ax(mesh, "fsdp"), _ax(mesh, "tensor")
  assert up.a.spec == P(None, fs, None) and up.b.spec == P(None, None, tp)

  # The train step (factored loss) against plain single-device optax.
  def step_loss(p, a, batch):
    pred = lorajax.lora(forward)(p, a, batch[0], mesh)
    return jnp.mean((pred - batch[1]) ** 2)

  train = lorajax.make_train_step(
      step_loss, OPT, param_shardings=psh, adapter_shardings=ash,
      batch_sharding=(ids_sh, y_sh))
  state = train.init(adapter)
  ref_a, ref_s = adapter_h, OPT.init(adapter_h)
  for step in range(2):
    ids_h, y_h = host_data(step)
    batch = (jax.device_put(ids_h, ids_sh), jax.device_put(y_h, y_sh))
    adapter, state, metrics = train.step(params, adapter, state, batch)
    loss = metrics["loss"]
    want, g = reference_value_and_grad(params_h, ref_a, ids_h, y_h)
    upd, ref_s = OPT.update(g, ref_s, ref_a)
    ref_a = optax.apply_updates(ref_a, upd)
    np.testing.assert_allclose(float(loss), float(want), rtol=2e-5)
  for x, r, s in zip(jax.tree.leaves(adapter), jax.tree.leaves(ref_a),
                     jax.tree.leaves(ash)):
    assert x.sharding.is_equivalent_to(s, x.ndim)
    np.testing.assert_allclose(np.asarray(x), np.asarray(r), rtol=1e-4,
                               atol=1e-5)


def test_checkpoint_round_trip_across_explicit_and_auto_meshes(
    host, tmp_path):
  params_h, adapter_h = host
  _, _, _, adapter = shard_all(make_mesh("2x2x2", "explicit"), params_h,
                               adapter_h)
  with lorajax.CheckpointManager(tmp_path, CONFIG) as mgr:
    mgr.save(5, adapter)
  for name, kind in (("8", "explicit"), ("2x4", "explicit"), ("2x4", "auto")):
    _, dst_ash, _, _ = shard_all(make_mesh(name, kind), params_h, adapter_h)
    template = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        adapter_h, dst_ash)
    with lorajax.CheckpointManager(tmp_path, CONFIG) as mgr:
      restored, _, step = mgr.restore(adapter=template)
    assert step == 5
    for x, r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(adapter_h),
                       jax.tree.leaves(dst_ash)):
      assert x.sharding.is_equivalent_to(s, x.ndim)
      np.testing.assert_array_equal(np.asarray(x), np.asarray(r))


def test_unannotated_model_on_explicit_mesh_says_what_to_annotate(host):
  """Where JAX needs the user's annotation (the model's own matmul), the
  error names the function and says how to annotate it."""
  mesh = make_mesh("8", "explicit")
  w = jax.device_put(np.ones((16, 32), np.float32),
                     NamedSharding(mesh, P(None, "fsdp")))
  x = jax.device_put(np.ones((8, 16), np.float32),
                     NamedSharding(mesh, P("fsdp", None)))
  params = {"w": w}
  adapter = lorajax.init(params, lorajax.LoraConfig(
      rank=2, alpha=4.0, targets="w"), key=jax.random.key(0))

  def model(p, x):
    return x @ p["w"]  # batch and output both on `fsdp`: ambiguous

  with pytest.raises(Exception, match=r"lorajax.lora \(.*model\) itself.*"
                     r"`out_sharding=`"):
    jax.jit(lorajax.lora(model))(params, adapter, x)
  psh = {"w": w.sharding}
  train = lorajax.make_train_step(
      lambda p, a, b: jnp.sum(model(lorajax.merge(p, a), b)),
      optax.sgd(0.1), param_shardings=psh,
      adapter_shardings=lorajax.adapter_shardings(psh, adapter),
      batch_sharding=x.sharding)
  with pytest.raises(Exception, match=r"`loss_fn` itself.*reshard"):
    train.step(params, adapter, train.init(adapter), x)
