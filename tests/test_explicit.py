"""LoRA on meshes with Explicit axes (JAX's `jax.make_mesh` default) and on
Auto meshes: merge, the factored path, init_sharded, adapter_shardings, the
train step and CheckpointManager, on the (8,), (2, 4) and (2, 2, 2) meshes of
8 simulated CPU devices. Every result is checked against an unsharded
single-device reference computed with plain numpy/jnp math."""

import dataclasses

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


# -- Megatron-style tensor parallelism: row- and column-parallel weights -----
# Column-parallel `up` (output axis sharded on `model`), row-parallel `down`
# (contracted axis sharded: the base matmul is a partial sum that the user's
# `out_sharding` resolves), a weight sharded on both axes
# (`P("data", "model")`), the batch on `data`. The reference is the model on
# weights merged in plain jnp (`W + scale * a @ b`, unsharded), not
# `lorajax.merge`.

TP_MESHES = {
    "8": ((8,), ("model",)),
    "2x4": ((2, 4), ("data", "model")),
    "2x2x2": ((2, 2, 2), ("data", "fsdp", "model")),
}
TD, TF, TB = 8, 16, 8
TP_CONFIG = lorajax.LoraConfig(rank=2, alpha=4.0, targets="up|down|mix")


def tp_mesh(name, kind):
  shape, names = TP_MESHES[name]
  return jax.make_mesh(shape, names, axis_types=(KINDS[kind],) * len(shape))


def tp_specs(mesh):
  dt = _ax(mesh, "data")
  return {"up": P(None, "model"), "down": P("model", None),
          "mix": P(dt, "model")}


def tp_forward(params, x, mesh=None):
  """MLP with column- then row-parallel weights, then a 2-D-sharded one.

  On an Explicit mesh the matmuls whose contracted axis is sharded name
  their result's sharding, as JAX asks; elsewhere it is plain jnp."""
  explicit = mesh is not None and mesh.axis_types[0] == AxisType.Explicit
  dt = _ax(mesh, "data") if mesh is not None else None

  def out(*spec):
    return NamedSharding(mesh, P(*spec)) if explicit else None

  h = jnp.tanh(jnp.einsum("bd,df->bf", x, params["up"],
                          out_sharding=out(dt, "model")))
  y = jnp.einsum("bf,fd->bd", h, params["down"],
                 out_sharding=out(dt, None))
  if explicit:  # the 2-D weight's input axis is on `data`, the batch's too
    y = jax.sharding.reshard(y, NamedSharding(mesh, P(None, dt)))
  return jnp.einsum("bd,de->be", y, params["mix"],
                    out_sharding=out(None, "model"))


def tp_loss(params, x, t, mesh=None):
  return jnp.mean((tp_forward(params, x, mesh) - t) ** 2)


def jnp_merge(params, adapter):
  """The merged weights in plain jnp: `W + scale * a @ b`."""
  return jax.tree.map(
      lambda n, w: w if n is None else w + n.scale * n.a @ n.b,
      adapter, params, is_leaf=lorajax.is_lora)


@pytest.fixture(scope="module")
def tp_host():
  rng = np.random.default_rng(0)
  params = {"up": rng.normal(size=(TD, TF)) / np.sqrt(TD),
            "down": rng.normal(size=(TF, TD)) / np.sqrt(TF),
            "mix": rng.normal(size=(TD, TD)) / np.sqrt(TD)}
  params = jax.tree.map(lambda w: w.astype(np.float32), params)
  adapter = perturbed(lorajax.init(params, TP_CONFIG, key=jax.random.key(1)))
  x = rng.normal(size=(TB, TD)).astype(np.float32)
  t = rng.normal(size=(TB, TD)).astype(np.float32)
  want, want_g = jax.jit(jax.value_and_grad(
      lambda a: tp_loss(jnp_merge(params, a), x, t)))(adapter)
  return params, adapter, x, t, float(want), want_g


def _close_grads(got, want, rtol=1e-4, atol=1e-5):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol,
                               atol=atol)


TP_CASES = [("8", "explicit"), ("2x4", "explicit"), ("2x2x2", "explicit"),
            ("2x4", "auto"), ("2x2x2", "auto")]


@pytest.mark.parametrize("mesh_name,kind", TP_CASES,
                         ids=[f"{m}-{k}" for m, k in TP_CASES])
def test_row_and_column_parallel_weights_match_the_merged_model(
    mesh_name, kind, tp_host):
  params_h, adapter_h, x_h, t_h, want, want_g = tp_host
  mesh = tp_mesh(mesh_name, kind)
  psh = jax.tree.map(lambda s: NamedSharding(mesh, s), tp_specs(mesh),
                     is_leaf=lambda s: isinstance(s, P))
  ash = lorajax.adapter_shardings(psh, adapter_h)
  params = jax.device_put(params_h, psh)
  adapter = jax.device_put(adapter_h, ash)
  bsh = NamedSharding(mesh, P(_ax(mesh, "data")))
  x, t = jax.device_put(x_h, bsh), jax.device_put(t_h, bsh)
  # The adapter of the row-parallel weight: `a` sharded like its rows.
  assert ash["down"].a.spec == P("model", None)
  assert ash["up"].b.spec == P(None, "model")

  def factored(p, a, x, t):
    return jnp.mean((lorajax.lora(tp_forward, strict=True)(p, a, x, mesh)
                     - t) ** 2)

  loss, g = jax.jit(jax.value_and_grad(factored, argnums=1))(
      params, adapter, x, t)
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  _close_grads(g, want_g)
  if kind == "explicit":  # (on Auto meshes the compiler chooses)
    for leaf, s in zip(jax.tree.leaves(g), jax.tree.leaves(ash)):
      assert leaf.sharding.is_equivalent_to(s, leaf.ndim)

  if (mesh_name, kind) != ("2x4", "explicit"):
    return
  # The train step, on an adapter born sharded (`init_sharded`).
  opt = optax.sgd(0.5)
  fresh = perturbed(lorajax.init_sharded(
      params, TP_CONFIG, key=jax.random.key(1), param_shardings=psh))
  fresh = jax.device_put(fresh, ash)
  fresh_h = jax.tree.map(np.asarray, fresh)  # (the step donates `fresh`)
  train = lorajax.make_train_step(
      lambda p, a, b: factored(p, a, *b), opt, param_shardings=psh,
      adapter_shardings=ash, batch_sharding=(bsh, bsh))
  new, _, metrics = train.step(params, fresh, train.init(fresh), (x, t))
  loss, g = jax.value_and_grad(
      lambda a: tp_loss(jnp_merge(params_h, a), x_h, t_h))(fresh_h)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=2e-5)
  want_new = jax.tree.map(lambda a, d: a - 0.5 * d, fresh_h, g)
  _close_grads(new, want_new)


def _explicit_2x4():
  return tp_mesh("2x4", "explicit")


def _sharded(mesh, params, adapter, specs):
  psh = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  ash = lorajax.adapter_shardings(psh, adapter)
  return jax.device_put(params, psh), jax.device_put(adapter, ash)


def _dora_merge(params, adapter):
  """DoRA in plain jnp: `m * V / stop_gradient(||V||)`, `V = W + s a b`,
  the norm over the input axis (axis 0 of an (in, out) weight)."""
  def one(n, w):
    v = w + n.scale * n.a @ n.b
    norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v * v, axis=0)))
    return n.magnitude * v / norm
  return jax.tree.map(one, adapter, params, is_leaf=lorajax.is_lora)


def _conv(w, x, out=None):
  return jax.lax.conv_general_dilated(
      x, w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"),
      out_sharding=out)


ROW_CASES = ["dora", "fused_qkv", "conv", "embedding", "ragged_dot"]


@pytest.mark.parametrize("case", ROW_CASES)
def test_row_parallel_adapter_kinds_on_an_explicit_mesh(case):
  """DoRA, fused (concatenated) weights, convolutions, an embedding lookup
  under `.at[].get(out_sharding=)` (a `jax.sharding.auto_axes` region) and
  a grouped matmul, each on a weight whose contracted axis is sharded
  (`plain` is the same model without annotations, for the reference)."""
  mesh = _explicit_2x4()
  rng = np.random.default_rng(5)

  def ns(*s):
    return NamedSharding(mesh, P(*s))

  def arr(*shape):
    return rng.normal(size=shape).astype(np.float32)

  grads, reference = True, jnp_merge
  if case == "dora":
    params, specs = {"w": arr(16, 8)}, {"w": P("model", None)}
    cfg = lorajax.LoraConfig(rank=2, alpha=4.0, targets="w", use_dora=True)
    x, x_spec = arr(4, 16), P("data", "model")
    reference = _dora_merge

    def fn(p, x, annotate=True):
      out = ns("data", None) if annotate else None
      return jnp.einsum("bf,fd->bd", x, p["w"], out_sharding=out)
  elif case == "fused_qkv":
    params = {"q": arr(16, 8), "k": arr(16, 8), "v": arr(16, 8)}
    specs = dict.fromkeys(params, P("model", None))
    cfg = lorajax.LoraConfig(rank=2, alpha=4.0, targets="q|k|v")
    x, x_spec = arr(4, 16), P("data", "model")

    def fn(p, x, annotate=True):
      out = ns("data", None) if annotate else None
      w = jnp.concatenate([p["q"], p["k"], p["v"]], axis=1)
      return jnp.einsum("bf,fd->bd", x, w, out_sharding=out)
  elif case == "conv":
    params, specs = {"w": arr(3, 8, 8)}, {"w": P(None, "model", None)}
    cfg = lorajax.LoraConfig(rank=2, alpha=4.0, targets="w",
                             axes={"w": "iio"})
    x, x_spec = arr(4, 5, 8), P("data", None, "model")

    def reference(p, a):
      n = a["w"]
      return {"w": p["w"] + n.scale * jnp.einsum("kcr,ro->kco", n.a, n.b)}

    def fn(p, x, annotate=True):
      out = ns("data", None, None) if annotate else None
      return _conv(p["w"], x, out)
  elif case == "embedding":
    params, specs = {"w": arr(32, 8)}, {"w": P("model", None)}
    cfg = lorajax.LoraConfig(rank=2, alpha=4.0, targets="w")
    x, x_spec = rng.integers(0, 32, (4,)).astype(np.int32), P("data")

    def fn(p, i, annotate=True):
      out = ns("data", None) if annotate else None
      if out is None:
        return jnp.asarray(p["w"])[i]
      return p["w"].at[i].get(out_sharding=out)
  else:  # ragged_dot: JAX has no Explicit-mode gradient for it (not even
    # for the merged weight), so the forward value only.
    grads = False
    params, specs = {"w": arr(2, 16, 8)}, {"w": P(None, "model", None)}
    cfg = lorajax.LoraConfig(rank=2, alpha=4.0, targets="w",
                             axes={"w": "sio"})
    groups = np.array([3, 1], np.int32)
    x, x_spec = arr(4, 16), P(None, "model")

    def reference(p, a):
      n = a["w"]
      return {"w": p["w"] + n.scale * jnp.einsum("eir,ero->eio", n.a, n.b)}

    def fn(p, x, annotate=True):
      out = ns(None, None) if annotate else None
      return jax.lax.ragged_dot(x, p["w"], groups, out_sharding=out)

  adapter_h = perturbed(lorajax.init(params, cfg, key=jax.random.key(2)))
  params_d, adapter_d = _sharded(mesh, params, adapter_h, specs)
  x_d = jax.device_put(x, ns(*x_spec))
  f = lorajax.lora(fn, strict=True)

  def loss(y):
    return jnp.sum(jnp.sin(y))

  want_y = fn(reference(params, adapter_h), x, annotate=False)
  if grads:
    g, y = jax.jit(jax.grad(lambda a: (loss(y := f(params_d, a, x_d)), y),
                            has_aux=True))(adapter_d)
    _close_grads(g, jax.grad(lambda a: loss(fn(
        reference(params, a), x, annotate=False)))(adapter_h))
  else:
    y = jax.jit(f)(params_d, adapter_d, x_d)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want_y), rtol=1e-5,
                             atol=1e-5)


def test_embedding_lookup_under_set_mesh_stays_factored():
  """`.at[].get(out_sharding=)` traces an Auto-mesh region; inside
  `jax.set_mesh` its equations must run in that region's context."""
  mesh = _explicit_2x4()
  rng = np.random.default_rng(6)
  params = {"w": rng.normal(size=(32, 8)).astype(np.float32)}
  cfg = lorajax.LoraConfig(rank=2, alpha=4.0, targets="w")
  adapter_h = perturbed(lorajax.init(params, cfg, key=jax.random.key(2)))
  params_d, adapter_d = _sharded(mesh, params, adapter_h,
                                 {"w": P("model", None)})
  ids = np.array([3, 1, 30, 3], np.int32)

  def fn(p, i):
    return p["w"].at[i].get(out_sharding=P("data", None))

  with jax.set_mesh(mesh):
    y = jax.jit(lorajax.lora(fn, strict=True))(
        params_d, adapter_d, jax.device_put(ids, P("data")))
  np.testing.assert_allclose(np.asarray(y),
                             jnp_merge(params, adapter_h)["w"][ids],
                             rtol=1e-5, atol=1e-6)


def test_primitives_resolve_inside_an_explicit_set_mesh():
  """The rule table's primitives are found (once per process) even when
  the first `lorajax.lora` call happens inside `jax.set_mesh`."""
  from lorajax._src.core import jax_compat

  outside = jax_compat.primitives()
  with jax.set_mesh(_explicit_2x4()):
    inside = jax_compat.primitives.__wrapped__()
  assert {"reshard", "shard_map", "pvary", "ragged_dot_general"} <= set(inside)
  assert inside == outside


# -- shard_map bodies that use adapted weights --------------------------------


def _shard_map_fns():
  fns = {"jax.shard_map": jax.shard_map}
  try:
    import warnings
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      from jax.experimental.shard_map import shard_map
    fns["experimental"] = shard_map
  except ImportError:  # removed in a newer JAX
    pass
  return fns


SM_CASES = [(k, n, "lora") for k in ("explicit", "auto")
            for n in _shard_map_fns()] + [("explicit", "jax.shard_map", "dora")]


def _check_mlp_vs_merged(mlp, sharded, host, t_h, merge):
  """`lora(mlp, strict=True)`'s value and adapter gradient of a sin-weighted
  loss, on the sharded arrays, equal the dense `tanh(x @ up) @ down` of the
  `merge`d host weights. Returns the transformed function."""
  params, adapter, x = sharded
  params_h, adapter_h, x_h = host

  def loss(y):
    return jnp.sum(jnp.sin(y) * t_h)

  f = lorajax.lora(mlp, strict=True)
  val, g = jax.jit(jax.value_and_grad(lambda a: loss(f(params, a, x))))(
      adapter)
  want, want_g = jax.value_and_grad(lambda a: loss(
      jnp.tanh(x_h @ merge(params_h, a)["up"])
      @ merge(params_h, a)["down"]))(adapter_h)
  np.testing.assert_allclose(float(val), float(want), rtol=1e-5, atol=1e-5)
  _close_grads(g, want_g)
  return f


@pytest.mark.parametrize("kind,api,method", SM_CASES,
                         ids=["-".join(c) for c in SM_CASES])
def test_shard_map_body_with_adapted_weights_stays_factored(
    kind, api, method, tp_host):
  """Column-parallel `up`, row-parallel `down` with the user's `psum`,
  inside `shard_map`: no fallback (`strict=True`), value and gradient as
  the plain-jnp merged model."""
  params_h, adapter_h, x_h, t_h, _, _ = tp_host
  smap = _shard_map_fns()[api]
  mesh = tp_mesh("2x4", kind)
  params_h = {k: params_h[k] for k in ("up", "down")}
  adapter_h = {k: adapter_h[k] for k in ("up", "down")}
  merge = jnp_merge
  if method == "dora":
    adapter_h = perturbed(lorajax.init(params_h, dataclasses.replace(
        TP_CONFIG, use_dora=True), key=jax.random.key(4)))
    merge = _dora_merge
  params, adapter = _sharded(mesh, params_h, adapter_h, {
      "up": P(None, "model"), "down": P("model", None)})
  x = jax.device_put(x_h, NamedSharding(mesh, P("data")))

  def mlp(p, x):
    def body(x, up, down):
      y = jnp.tanh(x @ up) @ down  # a partial sum over `model`
      return jax.lax.psum(y, "model")

    return smap(body, mesh=mesh,
                in_specs=(P("data", None), P(None, "model"),
                          P("model", None)),
                out_specs=P("data", None))(x, p["up"], p["down"])

  f = _check_mlp_vs_merged(mlp, (params, adapter, x),
                           (params_h, adapter_h, x_h), t_h, merge)
  # The body's jaxpr runs the factors through `shard_map`: the adapter's
  # arrays are inputs of the new shard_map, and no weight-shaped sum is
  # formed inside it.
  jaxpr = jax.make_jaxpr(lambda a: f(params, a, x))(adapter)
  sm = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "shard_map"]
  parts = 3 if method == "dora" else 2  # a, b (and DoRA's scale)
  assert len(sm) == 1 and len(sm[0].invars) == 3 + 2 * parts


def test_shard_map_fsdp_all_gather_stays_factored(tp_host):
  """FSDP by hand: weights sharded on `fsdp` too, all-gathered in the body
  (`all_gather(..., tiled=True)` gathers the factor holding that axis).
  Gathering along an axis a factor is not sharded like (here: over the
  mesh axis that shards `b`) is not a block gather of the weight: it falls
  back, reported, and stays correct."""
  params_h, adapter_h, x_h, t_h, _, _ = tp_host
  mesh = jax.make_mesh((2, 4), ("fsdp", "model"),
                       axis_types=(AxisType.Explicit,) * 2)
  specs = {"up": P("fsdp", "model"), "down": P("model", "fsdp")}
  params_h = {k: params_h[k] for k in specs}
  adapter_h = {k: adapter_h[k] for k in specs}
  params, adapter = _sharded(mesh, params_h, adapter_h, specs)
  x = jax.device_put(x_h, NamedSharding(mesh, P("fsdp")))

  def mlp(p, x):
    def body(x, up, down):
      up = jax.lax.all_gather(up, "fsdp", axis=0, tiled=True)
      down = jax.lax.all_gather(down, "fsdp", axis=1, tiled=True)
      return jax.lax.psum(jnp.tanh(x @ up) @ down, "model")

    return jax.shard_map(body, mesh=mesh, in_specs=(
        P("fsdp", None), specs["up"], specs["down"]),
                         out_specs=P("fsdp", None))(x, p["up"], p["down"])

  _check_mlp_vs_merged(mlp, (params, adapter, x), (params_h, adapter_h, x_h),
                       t_h, jnp_merge)

  def odd(p, x):  # gathers `up`'s input axis over `model`, which shards b
    def body(x, up):
      return x @ jax.lax.all_gather(up, "model", axis=0, tiled=True)[:TD]

    return jax.shard_map(body, mesh=mesh, in_specs=(
        P("fsdp", None), specs["up"]), out_specs=P("fsdp", "model"))(
            x, p["up"])

  with pytest.raises(lorajax.LoraFallbackError, match=r"'up'.*all_gather"):
    jax.jit(lorajax.lora(odd, strict=True))(params, adapter, x)
  with pytest.warns(lorajax.LoraFallbackWarning, match="all_gather"):
    y = jax.jit(lorajax.lora(odd))(params, adapter, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(
      odd(lorajax.merge(params, adapter), x)), rtol=1e-5, atol=1e-5)


def test_infer_axes_follows_weights_into_shard_map():
  """`lorajax.sharding.infer_axes` reads the roles inside the body."""
  mesh = tp_mesh("2x4", "auto")
  params = {"o": jax.ShapeDtypeStruct((4, 2, 8), jnp.float32)}
  x = jax.ShapeDtypeStruct((8, 4, 2), jnp.float32)

  def attn_out(p, x):
    def body(x, o):
      return jax.lax.psum(jnp.einsum("bhk,hkd->bd", x, o), "model")

    return jax.shard_map(body, mesh=mesh, in_specs=(
        P("data", "model", None), P("model", None, None)),
                         out_specs=P("data", None))(x, p["o"])

  axes = lorajax.sharding.infer_axes(
      attn_out, params, x, config=lorajax.LoraConfig(rank=2, targets="o"))
  assert axes == {"o": "iio"}
