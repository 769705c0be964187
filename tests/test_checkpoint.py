"""Orbax checkpoints of LoRA training state: exact resume (also after a kill),
resharding restores, async saves, corrupt steps, and mismatched templates."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lorajax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import multihost_cpu as ex  # noqa: E402

STEPS = 6


def batch_of(step, sharding):
  return lorajax.sharding.global_batch(ex.global_batch_numpy(step), sharding)


def run_steps(setup, adapter, opt_state, start, stop):
  params, _, _, train, bsh = setup
  losses = []
  for step in range(start, stop):
    adapter, opt_state, metrics = train.step(params, adapter, opt_state,
                                             batch_of(step, bsh))
    losses.append(float(metrics["loss"]))
  return adapter, opt_state, losses


_TEMPLATES = {}


def fresh(setup):
  """Templates: a new adapter and optimizer state on the same mesh (restore
  reads them only, so they are made once per setup)."""
  if id(setup) not in _TEMPLATES:
    _TEMPLATES[id(setup)] = (setup, _fresh(setup))
  return _TEMPLATES[id(setup)][1]


def _fresh(setup):
  params, _, _, train, _ = setup
  adapter = lorajax.init_sharded(
      params, ex.CONFIG, key=jax.random.key(99),
      param_shardings=jax.tree.map(lambda x: x.sharding, params))
  return adapter, train.init(adapter)


def leaves_equal(x, y):
  lx, ly = jax.tree.leaves(x), jax.tree.leaves(y)
  assert len(lx) == len(ly)
  for a, b in zip(lx, ly):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def uninterrupted():
  """The reference: STEPS steps without any checkpointing."""
  setup = ex.setup(ex.make_mesh())
  adapter, opt_state, losses = run_steps(setup, setup[1], setup[2], 0, STEPS)
  return setup, adapter, opt_state, losses


def test_save_restore_continue_is_bit_exact(tmp_path, uninterrupted):
  setup, ref_adapter, ref_opt, ref_losses = uninterrupted
  s2 = ex.setup(ex.make_mesh())
  adapter, opt_state, losses = run_steps(s2, s2[1], s2[2], 0, 3)
  mgr = lorajax.CheckpointManager(tmp_path, ex.CONFIG)
  assert mgr.save(3, adapter, opt_state)  # async
  # Keep training right away: the step donates (deletes) what was saved.
  run_steps(s2, adapter, opt_state, 3, 5)
  mgr.close()
  with lorajax.CheckpointManager(tmp_path, ex.CONFIG) as mgr2:
    t_adapter, t_opt = fresh(s2)
    adapter, opt_state, step = mgr2.restore(adapter=t_adapter,
                                            opt_state=t_opt)
  assert step == 3
  adapter, opt_state, more = run_steps(s2, adapter, opt_state, 3, STEPS)
  assert losses + more == ref_losses  # exactly
  leaves_equal(adapter, ref_adapter)
  leaves_equal(opt_state, ref_opt)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 8)
    sys.path.insert(0, os.path.join(sys.argv[1], "examples"))
    import multihost_cpu as ex
    import lorajax
    params, adapter, opt_state, train, bsh = ex.setup(ex.make_mesh())
    mgr = lorajax.CheckpointManager(sys.argv[2], ex.CONFIG, max_to_keep=2)
    for step in range(5):
      batch = lorajax.sharding.global_batch(ex.global_batch_numpy(step), bsh)
      adapter, opt_state, _ = train.step(params, adapter, opt_state, batch)
      mgr.save(step + 1, adapter, opt_state)
      if step + 1 == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # mid-save, no clean-up
""")


def test_kill_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
  setup, ref_adapter, ref_opt, ref_losses = uninterrupted
  proc = subprocess.run(
      [sys.executable, "-c", KILL_SCRIPT, ROOT, str(tmp_path), "4"],
      capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == -9, proc.stderr[-2000:]
  with lorajax.CheckpointManager(tmp_path, ex.CONFIG) as mgr:
    # Step 4's save may or may not have finished before the kill; an
    # unfinished one is not listed. Keep-last-2 removed steps 1 (and 2).
    steps = mgr.all_steps()
    assert steps in ([2, 3], [3, 4]), steps
    t_adapter, t_opt = fresh(setup)
    adapter, opt_state, step = mgr.restore(adapter=t_adapter,
                                           opt_state=t_opt)
  assert step == steps[-1]
  adapter, opt_state, more = run_steps(setup, adapter, opt_state, step, STEPS)
  assert more == ref_losses[step:]  # exactly
  leaves_equal(adapter, ref_adapter)
  leaves_equal(opt_state, ref_opt)


EXIT_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    jax.config.update("jax_platforms", "cpu")
    sys.path.insert(0, sys.argv[1])
    import lorajax
    params = {"big": {"kernel": jax.ShapeDtypeStruct((2048, 2048), np.float32)}}
    config = lorajax.LoraConfig(rank=256)
    adapter = lorajax.init(params, config, key=jax.random.key(3))
    mgr = lorajax.CheckpointManager(sys.argv[2], config)
    mgr.save(1, adapter)
    # No wait, no close: the interpreter exits with the save in flight.
""")


def test_async_save_finishes_before_exit(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-c", EXIT_SCRIPT, ROOT, str(tmp_path)],
      capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  params = {"big": {"kernel": jax.ShapeDtypeStruct((2048, 2048), np.float32)}}
  config = lorajax.LoraConfig(rank=256)
  want = lorajax.init(params, config, key=jax.random.key(3))
  with lorajax.CheckpointManager(tmp_path, config) as mgr:
    assert mgr.all_steps() == [1]
    got, _, _ = mgr.restore(adapter=want)
  leaves_equal(got, want)


def test_restore_onto_other_meshes(tmp_path, uninterrupted):
  setup, ref_adapter, ref_opt, _ = uninterrupted
  with lorajax.CheckpointManager(tmp_path, ex.CONFIG) as mgr:
    mgr.save(STEPS, ref_adapter, ref_opt)
  # An (8,) fsdp mesh with the base weights sharded differently.
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  specs = {"attn": {"q": {"kernel": P("fsdp", None, None)},
                    "o": {"kernel": P("fsdp", None)}},
           "mlp": {"up": {"kernel": P(None, "fsdp", None)},
                   "down": {"kernel": P(None, None, "fsdp")}},
           "norm": {"scale": P()}}
  psh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                     is_leaf=lambda x: isinstance(x, P))
  abstract_params = jax.eval_shape(ex.init_params, jax.random.key(0))
  template = lorajax.init_sharded(abstract_params, ex.CONFIG,
                                  key=jax.random.key(5), param_shardings=psh)
  ash = lorajax.adapter_shardings(psh, template)
  train = lorajax.make_train_step(
      ex.loss_fn, optax.adam(3e-2), param_shardings=psh,
      adapter_shardings=ash, batch_sharding=NamedSharding(mesh, P("fsdp")))
  opt_template = train.init(template)
  with lorajax.CheckpointManager(tmp_path, ex.CONFIG) as mgr:
    adapter, opt_state, step = mgr.restore(adapter=template,
                                           opt_state=opt_template)
  assert step == STEPS
  leaves_equal(adapter, ref_adapter)
  leaves_equal(opt_state, ref_opt)
  assert adapter["mlp"]["down"]["kernel"].b.sharding.spec == P(
      None, None, "fsdp")
  for x, t in zip(jax.tree.leaves((adapter, opt_state)),
                  jax.tree.leaves((template, opt_template))):
    assert x.sharding == t.sharding
  # Onto one device, from abstract templates (jax.ShapeDtypeStruct).
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[3])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
      jax.eval_shape(lambda: lorajax.init(abstract_params, ex.CONFIG,
                                          key=jax.random.key(0))))
  with lorajax.CheckpointManager(tmp_path, ex.CONFIG) as mgr:
    adapter, none, _ = mgr.restore(adapter=abstract)
  assert none is None
  leaves_equal(adapter, ref_adapter)
  assert adapter["attn"]["q"]["kernel"].a.sharding == dev


def test_keep_last_n_sizes_and_metadata(tmp_path, uninterrupted):
  setup, adapter, opt_state, _ = uninterrupted
  config = ex.CONFIG
  with lorajax.CheckpointManager(tmp_path / "both", config,
                                 max_to_keep=2) as mgr:
    for step in range(1, 6):
      mgr.save(step, adapter, opt_state, metadata={"epoch": step // 2})
    mgr.wait_until_finished()
    assert mgr.all_steps() == [4, 5]
    assert mgr.latest_step() == 5
    # Listing needs no config (and no manager).
    assert lorajax.CheckpointManager.saved_steps(tmp_path / "both") == [4, 5]
    assert lorajax.CheckpointManager.saved_steps(tmp_path / "none") == []
    assert mgr.saved_config() == config
    meta = mgr.metadata(5)
    assert meta["user"] == {"epoch": 2}
    assert meta["step"] == 5
    with_opt = mgr.nbytes()
  with lorajax.CheckpointManager(tmp_path / "adapter", config) as mgr:
    mgr.save(1, adapter)
    adapter_only = mgr.nbytes(1)
  # Independent count from the shapes: a (*stack, *in, r), b (*stack, r, *out).
  r = config.rank
  n = (16 * r + r * 16) + (16 * r + r * 4 * 4) + 2 * (16 * r + r * 32) + 2 * (
      32 * r + r * 16)
  assert mgr_meta_bytes(tmp_path / "adapter") == 4 * n
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(setup[0]))
  assert with_opt > adapter_only
  # Orbax adds a few KB of metadata per checkpoint; the arrays dominate at
  # real sizes (see benchmarks/results/checkpoint.md).
  assert adapter_only < 4 * n + 64 * 1024
  assert base_bytes > 4 * n


def mgr_meta_bytes(path):
  with lorajax.CheckpointManager(path, ex.CONFIG) as mgr:
    return mgr.metadata()["adapter_bytes"]


def _save_three(path, adapter, opt_state):
  with lorajax.CheckpointManager(path, ex.CONFIG) as mgr:
    for step in (1, 2, 3):
      mgr.save(step, adapter, opt_state)
  return path


def _truncate_data(step_dir):
  n = 0
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      p = os.path.join(root, f)
      if os.sep + "d" + os.sep in p:
        with open(p, "r+b") as fh:
          fh.truncate(os.path.getsize(p) // 2)
        n += 1
  assert n > 0


def _corrupt_truncated(step_dir):
  _truncate_data(step_dir)


def _corrupt_missing_meta(step_dir):
  os.remove(os.path.join(step_dir, "meta", "metadata"))


def _corrupt_missing_manifest(step_dir):
  os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def _corrupt_checksum(step_dir):
  # Contents that differ from what was saved, but read without error.
  p = os.path.join(step_dir, "meta", "metadata")
  with open(p) as fh:
    meta = json.load(fh)
  meta["checksums"]["adapter/0/a"] = (meta["checksums"]["adapter/0/a"] + 1) % (
      2**32)
  with open(p, "w") as fh:
    json.dump(meta, fh)


def _corrupt_foreign(step_dir):
  p = os.path.join(step_dir, "meta", "metadata")
  with open(p, "w") as fh:
    json.dump({"something": "else"}, fh)


CORRUPTIONS = {
    "foreign-metadata": (_corrupt_foreign, "is not a lorajax checkpoint"),
    "truncated-data": (_corrupt_truncated, "cannot be read"),
    "missing-metadata": (_corrupt_missing_meta, "no readable metadata"),
    "missing-manifest": (_corrupt_missing_manifest, "cannot be read"),
    "bad-checksum": (_corrupt_checksum,
                     r"checksum mismatch\): 'attn/o/kernel'.a"),
}


# A failed tensorstore read can leave an orbax event-loop callback that
# Python reports as unraisable; the test checks the outcome, not that noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_corrupt_step_falls_back_to_previous(tmp_path, uninterrupted, kind):
  setup, adapter, opt_state, _ = uninterrupted
  _save_three(tmp_path, adapter, opt_state)
  corrupt, why = CORRUPTIONS[kind]
  corrupt(os.path.join(tmp_path, "3"))
  with lorajax.CheckpointManager(tmp_path, ex.CONFIG) as mgr:
    with pytest.warns(RuntimeWarning,
                      match=rf"corrupt checkpoint step 3:.*{why}"):
      got, got_opt, step = mgr.restore(adapter=fresh(setup)[0],
                                       opt_state=fresh(setup)[1])
    assert step == 2
    leaves_equal((got, got_opt), (adapter, opt_state))
    with pytest.raises(lorajax.CorruptCheckpointError,
                       match=rf"step 3 .*{why}"):
      mgr.restore(3, adapter=fresh(setup)[0])
    # Saving step 3 again replaces the corrupt one.
    mgr.save(3, adapter, opt_state)
    mgr.wait_until_finished()
    assert mgr.restore(3, adapter=fresh(setup)[0])[2] == 3


def test_interrupted_save_is_ignored(tmp_path, uninterrupted):
  setup, adapter, opt_state, _ = uninterrupted
  _save_three(tmp_path, adapter, opt_state)
  # What an interrupted orbax save leaves: a temporary step directory.
  tmp_step = os.path.join(tmp_path, "4.orbax-checkpoint-tmp-1700000000")
  os.makedirs(os.path.join(tmp_step, "state"))
  with open(os.path.join(tmp_step, "state", "manifest.ocdbt"), "wb") as fh:
    fh.write(b"\0" * 10)
  with lorajax.CheckpointManager(tmp_path, ex.CONFIG) as mgr:
    assert mgr.all_steps() == [1, 2, 3]
    assert mgr.restore(adapter=fresh(setup)[0])[2] == 3


def test_all_steps_corrupt_raises(tmp_path, uninterrupted):
  setup, adapter, opt_state, _ = uninterrupted
  with lorajax.CheckpointManager(tmp_path, ex.CONFIG) as mgr:
    mgr.save(1, adapter)
  _corrupt_missing_meta(os.path.join(tmp_path, "1"))
  with (lorajax.CheckpointManager(tmp_path, ex.CONFIG) as mgr,
        pytest.warns(RuntimeWarning, match="step 1"),
        pytest.raises(FileNotFoundError,
                      match=r"No readable checkpoint.*corrupt steps: \[1\]")):
    mgr.restore(adapter=adapter)


def _template(config):
  abstract_params = jax.eval_shape(ex.init_params, jax.random.key(0))
  return jax.eval_shape(lambda: lorajax.init(abstract_params, config,
                                             key=jax.random.key(0)))


def test_mismatched_template_raises_naming_the_path(tmp_path, uninterrupted):
  _, adapter, opt_state, _ = uninterrupted
  with lorajax.CheckpointManager(tmp_path, ex.CONFIG) as mgr:
    mgr.save(1, adapter, opt_state)
    mgr.save(2, adapter)
    mgr.wait_until_finished()
    kw = dict(ex.CONFIG.to_dict())
    with pytest.raises(ValueError, match=(
        r"'attn/o/kernel': the checkpoint has a\(16, 4\) b\(4, 16\) \(rank 4\),"
        r" the template a\(16, 2\) b\(2, 16\) \(rank 2\)")):
      mgr.restore(1, adapter=_template(lorajax.LoraConfig(**{**kw, "rank": 2})))
    with pytest.raises(ValueError, match=(
        r"'mlp/up/kernel': the checkpoint has scale 2.0 \(alpha 8.0\), the"
        r" template 4.0 \(alpha 16.0\)")):
      mgr.restore(1, adapter=_template(
          lorajax.LoraConfig(**{**kw, "alpha": 16.0})))
    with pytest.raises(ValueError, match=(
        r"'mlp/up/kernel' is in the checkpoint but not in the template")):
      mgr.restore(1, adapter=_template(
          lorajax.LoraConfig(**{**kw, "targets": "attn/.*"})))
    with pytest.raises(ValueError, match=r"saved with \{'rank': 4"):
      mgr.restore(1, adapter=_template(lorajax.LoraConfig(**{**kw, "rank": 2})))
    sgd_state = optax.sgd(0.1, momentum=0.9).init(adapter)
    with pytest.raises(ValueError, match=r"optimizer state has 17 arrays in"
                       r" the checkpoint and 8 in the template"):
      mgr.restore(1, adapter=adapter, opt_state=sgd_state)
    with pytest.raises(ValueError, match=r"`opt_state` was given but the"
                       r" checkpoint has none"):
      mgr.restore(2, adapter=adapter, opt_state=opt_state)
    with pytest.raises(TypeError, match=r"at 'attn/o/kernel' it holds int"):
      mgr.restore(1, adapter={"attn": {"o": {"kernel": 1}}})
    with pytest.raises(TypeError, match=r"at 'w': `a` must be an array"):
      mgr.restore(1, adapter={"w": lorajax.LoraWeight(a=1.0, b=2.0,
                                                      alpha=1.0)})
    with pytest.raises(ValueError, match=r"`adapter` holds no LoraWeight"):
      mgr.restore(1, adapter={"w": None})


def test_manager_errors(tmp_path, uninterrupted):
  _, adapter, _, _ = uninterrupted
  with pytest.raises(TypeError, match=r"`config` must be a LoraConfig"):
    lorajax.CheckpointManager(tmp_path, {"rank": 4})
  with pytest.raises(ValueError, match=r"`max_to_keep` must be >= 1"):
    lorajax.CheckpointManager(tmp_path, ex.CONFIG, max_to_keep=0)
  mgr = lorajax.CheckpointManager(tmp_path, ex.CONFIG)
  with pytest.raises(FileNotFoundError, match=r"No checkpoint in"):
    mgr.restore(adapter=adapter)
  with pytest.raises(FileNotFoundError, match=r"No checkpoint in"):
    mgr.nbytes()
  with pytest.raises(ValueError, match=r"`step` must be a non-negative int"):
    mgr.save(-1, adapter)
  mgr.save(1, adapter)
  mgr.wait_until_finished()
  with pytest.raises(ValueError, match=r"step 1 already exists"):
    mgr.save(1, adapter)
  with pytest.raises(FileNotFoundError, match=r"No checkpoint step 7 .*\[1\]"):
    mgr.restore(7, adapter=adapter)
  mgr.close()
  with pytest.raises(ValueError, match=r"is closed; make a new one"):
    mgr.all_steps()
