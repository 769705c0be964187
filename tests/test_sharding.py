"""Sharded LoRA: adapter shardings, sharded init, the train step, and a
2-process `jax.distributed` run, on 8 simulated CPU devices."""

import importlib.util
import os
import tempfile

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lorajax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_example():
  spec = importlib.util.spec_from_file_location(
      "multihost_cpu", os.path.join(ROOT, "examples", "multihost_cpu.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


ex = _load_example()


def mesh_of(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


# Base weight specs per mesh and, written out by hand from the rule, the
# expected specs of `a` (*stack, *in, rank) and `b` (*stack, rank, *out).
# Weights: q (d, heads, hd) 'ioo'; o (heads*hd, d) 'io';
# up (layers, d, ff) 'sio'; down (layers, ff, d) 'sio'.
CASES = {
    "8-data": dict(
        mesh=((8,), ("data",)),
        batch=P("data"),
        params={
            "q": P("data", None, None), "o": P("data", None),
            "up": P(None, None, "data"), "down": P(None, "data", None),
        },
        expected={
            "q": (P("data", None), P(None, None, None)),
            "o": (P("data", None), P(None, None)),
            "up": (P(None, None, None), P(None, None, "data")),
            "down": (P(None, "data", None), P(None, None, None)),
        },
    ),
    "2x4-data-model": dict(
        mesh=((2, 4), ("data", "model")),
        batch=P("data"),
        params={
            "q": P(None, "model", None), "o": P("model", None),
            "up": P(None, None, "model"), "down": P(None, "model", None),
        },
        expected={
            "q": (P(None, None), P(None, "model", None)),
            "o": (P("model", None), P(None, None)),
            "up": (P(None, None, None), P(None, None, "model")),
            "down": (P(None, "model", None), P(None, None, None)),
        },
    ),
    "2x2x2-data-fsdp-tensor": dict(
        mesh=((2, 2, 2), ("data", "fsdp", "tensor")),
        batch=P(("data", "fsdp")),
        params={
            "q": P("fsdp", "tensor", None), "o": P("tensor", "fsdp"),
            "up": P("tensor", "fsdp", None), "down": P("tensor", None, "fsdp"),
        },
        expected={
            "q": (P("fsdp", None), P(None, "tensor", None)),
            "o": (P("tensor", None), P(None, "fsdp")),
            "up": (P("tensor", "fsdp", None), P("tensor", None, None)),
            "down": (P("tensor", None, None), P("tensor", None, "fsdp")),
        },
    ),
}

PATHS = {"q": ("attn", "q"), "o": ("attn", "o"), "up": ("mlp", "up"),
         "down": ("mlp", "down")}


def param_shardings(mesh, specs):
  tree = {"attn": {}, "mlp": {}, "norm": {"scale": NamedSharding(mesh, P())}}
  for name, (group, sub) in PATHS.items():
    tree[group][sub] = {"kernel": NamedSharding(mesh, specs[name])}
  return tree


def perturbed(adapter, seed=7):
  """The adapter with a non-zero `b` (so the delta is not trivially 0)."""
  leaves, treedef = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)
  ])


def reference_losses(params, adapter, steps):
  """Single-device, unsharded training with plain `jax.value_and_grad`: the
  independent reference."""
  opt = optax.adam(3e-2)
  state = opt.init(adapter)
  losses = []
  grad_fn = jax.jit(jax.value_and_grad(ex.loss_fn, argnums=1))
  for step in range(steps):
    batch = ex.global_batch_numpy(step)
    loss, g = grad_fn(params, adapter, batch)
    updates, state = opt.update(g, state, adapter)
    adapter = optax.apply_updates(adapter, updates)
    losses.append(float(loss))
  return losses, adapter


@pytest.fixture(scope="module")
def host_setup():
  params = ex.init_params(jax.random.key(0))
  adapter = perturbed(lorajax.init(params, ex.CONFIG, key=jax.random.key(1)))
  losses, final = reference_losses(params, adapter, 4)
  return params, adapter, losses, final


def _same_sharding(actual, mesh, spec, ndim):
  return actual.is_equivalent_to(NamedSharding(mesh, spec), ndim)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_adapter_shardings_follow_the_rule(case):
  c = CASES[case]
  mesh = mesh_of(*c["mesh"])
  psh = param_shardings(mesh, c["params"])
  params = jax.device_put(ex.init_params(jax.random.key(0)), psh)
  adapter = lorajax.init_sharded(params, ex.CONFIG, key=jax.random.key(1),
                                 param_shardings=psh)
  shardings = lorajax.adapter_shardings(psh, adapter)
  assert shardings["norm"]["scale"] is None
  for name, (group, sub) in PATHS.items():
    node = adapter[group][sub]["kernel"]
    sh = shardings[group][sub]["kernel"]
    want_a, want_b = c["expected"][name]
    assert sh.a.spec == want_a, (name, sh.a.spec)
    assert sh.b.spec == want_b, (name, sh.b.spec)
    # The arrays were created with those shardings (not replicated).
    assert _same_sharding(node.a.sharding, mesh, want_a, node.a.ndim), name
    assert _same_sharding(node.b.sharding, mesh, want_b, node.b.ndim), name
  # Same values as the unsharded init.
  host = lorajax.init(ex.init_params(jax.random.key(0)), ex.CONFIG,
                     key=jax.random.key(1))
  for x, y in zip(jax.tree.leaves(adapter), jax.tree.leaves(host)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_adapter_shardings_from_partition_specs_and_abstract_adapter():
  mesh = mesh_of((2, 4), ("data", "model"))
  specs = jax.tree.map(lambda s: s.spec, param_shardings(
      mesh, CASES["2x4-data-model"]["params"]))
  abstract = jax.eval_shape(lambda: lorajax.init(
      ex.init_params(jax.random.key(0)), ex.CONFIG, key=jax.random.key(1)))
  sh = lorajax.adapter_shardings(specs, abstract, mesh=mesh)
  assert sh["attn"]["q"]["kernel"].b == NamedSharding(
      mesh, P(None, "model", None))
  assert sh["attn"]["q"]["kernel"].axes == "ioo"


def test_overrides_replace_the_rule():
  mesh = mesh_of((2, 4), ("data", "model"))
  psh = param_shardings(mesh, CASES["2x4-data-model"]["params"])
  abstract = jax.eval_shape(lambda: lorajax.init(
      ex.init_params(jax.random.key(0)), ex.CONFIG, key=jax.random.key(1)))
  sh = lorajax.adapter_shardings(
      psh, abstract, overrides={r"attn/.*": (P(), P())})
  assert sh["attn"]["q"]["kernel"].b.spec == P()
  assert sh["attn"]["o"]["kernel"].a.spec == P()
  assert sh["mlp"]["up"]["kernel"].b.spec == P(None, None, "model")


def test_adapter_shardings_errors():
  mesh = mesh_of((2, 4), ("data", "model"))
  psh = param_shardings(mesh, CASES["2x4-data-model"]["params"])
  abstract = jax.eval_shape(lambda: lorajax.init(
      ex.init_params(jax.random.key(0)), ex.CONFIG, key=jax.random.key(1)))
  with pytest.raises(ValueError, match=r"`overrides` keys \['nothing/.*'\]"):
    lorajax.adapter_shardings(psh, abstract,
                              overrides={"nothing/.*": (P(), P())})
  with pytest.raises(ValueError, match=r"'attn/o/kernel'.*3 entries"):
    lorajax.adapter_shardings(
        psh, abstract, overrides={"attn/o/kernel": (P(None, None, None), P())})
  with pytest.raises(TypeError, match=r"`overrides\['attn/o/kernel'\]` must"):
    lorajax.adapter_shardings(psh, abstract,
                              overrides={"attn/o/kernel": P()})
  with pytest.raises(ValueError, match=r"not a valid regex"):
    lorajax.adapter_shardings(psh, abstract, overrides={"(": (P(), P())})
  specs = jax.tree.map(lambda s: s.spec, psh)
  with pytest.raises(ValueError, match=r"'attn/o/kernel'.*`mesh` is needed"):
    lorajax.adapter_shardings(specs, abstract)
  with pytest.raises(ValueError, match=r"must mirror the params"):
    lorajax.adapter_shardings({"attn": psh["attn"]}, abstract)
  bad = jax.tree.map(lambda s: s, psh)
  bad["attn"]["o"]["kernel"] = NamedSharding(mesh, P("model", None, None))
  with pytest.raises(ValueError, match=r"'attn/o/kernel' has 3 entries"):
    lorajax.adapter_shardings(bad, abstract)
  bad["attn"]["o"]["kernel"] = jax.sharding.SingleDeviceSharding(
      jax.devices()[0])
  with pytest.raises(TypeError, match=r"'attn/o/kernel' must be a"
                     r" NamedSharding, or a PartitionSpec with `mesh=`"):
    lorajax.adapter_shardings(bad, abstract)
  bad["attn"]["o"]["kernel"] = "model"
  with pytest.raises(TypeError, match=r"at 'attn/o/kernel' must be a NamedSh"):
    lorajax.adapter_shardings(bad, abstract)


def factored_loss_fn(params, adapter, batch):
  """`ex.loss_fn` through the factored path instead of `lorajax.merge`."""
  pred = lorajax.lora(ex.forward, strict=True)(params, adapter, batch["x"])
  return jax.numpy.mean((pred - batch["y"]) ** 2)


@pytest.mark.parametrize("case,mode", [
    *[(c, "merged") for c in CASES], ("2x2x2-data-fsdp-tensor", "factored")],
    ids=[*[f"{c}-merged" for c in CASES], "2x2x2-data-fsdp-tensor-factored"])
def test_sharded_train_step_matches_single_device(case, mode, host_setup):
  params_host, adapter_host, ref_losses, ref_final = host_setup
  c = CASES[case]
  mesh = mesh_of(*c["mesh"])
  psh = param_shardings(mesh, c["params"])
  params = jax.device_put(params_host, psh)
  ash = lorajax.adapter_shardings(psh, adapter_host)
  # From host copies: device_put of a device array may alias its buffers,
  # and the step donates (deletes) the adapter it is given.
  adapter = jax.device_put(jax.tree.map(np.asarray, adapter_host), ash)
  bsh = NamedSharding(mesh, c["batch"])
  traces = []

  def counted_loss(p, a, b):
    traces.append(1)
    return (ex.loss_fn if mode == "merged" else factored_loss_fn)(p, a, b)

  train = lorajax.make_train_step(
      counted_loss, optax.adam(3e-2), param_shardings=psh,
      adapter_shardings=ash, batch_sharding=bsh)
  opt_state = train.init(adapter)
  losses = []
  for step in range(4):
    batch = lorajax.sharding.global_batch(ex.global_batch_numpy(step), bsh)
    old = adapter
    adapter, opt_state, metrics = train.step(params, adapter, opt_state, batch)
    losses.append(float(metrics["loss"]))
    assert old["attn"]["q"]["kernel"].a.is_deleted()  # donated
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, atol=1e-6)
  for x, y in zip(jax.tree.leaves(adapter), jax.tree.leaves(ref_final)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4,
                               atol=2e-5)
  # The adapter and its optimizer state keep the adapter's shardings; the
  # frozen params are untouched and stay sharded as given.
  for x, s in zip(jax.tree.leaves(adapter), jax.tree.leaves(ash)):
    assert x.sharding.is_equivalent_to(s, x.ndim)
  mu = opt_state[0].mu
  for x, s in zip(jax.tree.leaves(mu), jax.tree.leaves(ash)):
    assert x.sharding.is_equivalent_to(s, x.ndim)
  for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(psh)):
    assert not x.is_deleted() and x.sharding.is_equivalent_to(s, x.ndim)
  assert len(traces) == 1  # no retrace on later steps


def test_train_step_has_aux_and_no_donation():
  mesh = mesh_of((8,), ("data",))
  psh = param_shardings(mesh, CASES["8-data"]["params"])
  params = jax.device_put(ex.init_params(jax.random.key(0)), psh)
  adapter = lorajax.init_sharded(params, ex.CONFIG, key=jax.random.key(1),
                                 param_shardings=psh)
  ash = lorajax.adapter_shardings(psh, adapter)
  bsh = NamedSharding(mesh, P("data"))

  def loss_aux(p, a, b):
    loss = ex.loss_fn(p, a, b)
    return loss, {"loss_x2": 2 * loss}

  train = lorajax.make_train_step(
      loss_aux, optax.sgd(0.1), param_shardings=psh, adapter_shardings=ash,
      batch_sharding=bsh, has_aux=True, donate=False)
  opt_state = train.init(adapter)
  batch = lorajax.sharding.global_batch(ex.global_batch_numpy(0), bsh)
  new, opt_state, metrics = train.step(params, adapter, opt_state, batch)
  loss, aux = metrics["loss"], metrics["aux"]
  assert not adapter["attn"]["q"]["kernel"].a.is_deleted()
  np.testing.assert_allclose(float(aux["loss_x2"]), 2 * float(loss), rtol=1e-6)
  want = float(ex.loss_fn(params, adapter, batch))
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)


def test_make_train_step_needs_named_shardings():
  with pytest.raises(ValueError, match=r"holds no NamedSharding"):
    lorajax.make_train_step(ex.loss_fn, optax.sgd(0.1), param_shardings=None,
                            adapter_shardings={"w": None}, batch_sharding=None)


def test_global_batch_single_process_is_device_put():
  mesh = mesh_of((2, 4), ("data", "model"))
  sh = NamedSharding(mesh, P("data"))
  host = ex.global_batch_numpy(3)
  out = lorajax.sharding.global_batch(host, sh)
  np.testing.assert_array_equal(np.asarray(out["x"]), host["x"])
  assert out["x"].sharding == sh
  per_leaf = lorajax.sharding.global_batch(
      host, {"x": sh, "y": NamedSharding(mesh, P())})
  assert per_leaf["y"].sharding.is_fully_replicated


def test_two_processes_match_single_process():
  """2 processes x 4 CPU devices, jax.distributed, one (2, 4) mesh: the
  losses equal an 8-device single-process run, and the checkpoint they
  wrote together restores here to the same adapter."""
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = os.path.join(tmp, "ckpt")
    reports = ex.launch(2, 4, steps=3, checkpoint_dir=ckpt, timeout=150)
    losses, adapter = ex.run(ex.make_mesh((2, 4)), 3)
    assert sorted(r["process"] for r in reports) == [0, 1]
    for r in reports:
      np.testing.assert_allclose(r["losses"], losses, rtol=2e-5, atol=1e-6)
    assert losses[-1] < losses[0]
    with lorajax.CheckpointManager(ckpt, ex.CONFIG) as mgr:
      restored, _, step = mgr.restore(adapter=adapter)
    assert step == 3
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(adapter)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4,
                                 atol=1e-6)
      assert x.sharding == y.sharding
