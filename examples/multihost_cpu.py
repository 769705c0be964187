"""Multi-process sharded LoRA fine-tuning, simulated on one CPU machine.

`python examples/multihost_cpu.py` starts 2 processes with 4 CPU devices each.
They join one JAX runtime with `jax.distributed.initialize`, build one
(2, 4) `("data", "model")` mesh over all 8 devices, create the frozen base
weights and the adapter directly on their shards, and each feeds its half of
every global batch. They save an orbax checkpoint together at the end. The
launcher prints each process's losses (identical: the loss is a global
value).

This is the same program that runs on a TPU pod or a multi-GPU cluster: there
you start one process per host (per GPU), call `jax.distributed.initialize()`
(TPU pods and SLURM/Open MPI clusters fill in the arguments) and leave out
the CPU-only `jax_num_cpu_devices` line.

Options: `--num-processes`, `--devices-per-process`, `--steps`,
`--checkpoint-dir`; `--worker` marks the child processes.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

try:
  import lorajax
except ImportError:  # Run from a source checkout without installing lorajax.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  import lorajax

D, HEADS, HEAD_DIM, FF, LAYERS = 16, 4, 4, 32, 2
GLOBAL_BATCH = 16

# How the frozen base weights are sharded on the ("data", "model") mesh:
# Megatron-style tensor parallelism on "model", data parallelism on "data".
PARAM_SPECS = {
    "attn": {"q": {"kernel": P(None, "model", None)},   # (d, heads, hd)
             "o": {"kernel": P("model", None)}},        # (heads*hd, d)
    "mlp": {"up": {"kernel": P(None, None, "model")},   # (layers, d, ff)
            "down": {"kernel": P(None, "model", None)}},  # (layers, ff, d)
    "norm": {"scale": P()},
}

CONFIG = lorajax.LoraConfig(
    rank=4, alpha=8.0, targets="all-linear",
    axes={"attn/q/kernel": "ioo", "mlp/.*/kernel": "sio"},
)


def make_mesh(shape=(2, 4), names=("data", "model")) -> jax.sharding.Mesh:
  """A mesh over all devices of all processes (Auto sharding mode)."""
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def init_params(key: jax.Array) -> dict:
  """The frozen base weights of a tiny attention + stacked-MLP model."""
  k = jax.random.split(key, 4)
  return {
      "attn": {
          "q": {"kernel": jax.random.normal(k[0], (D, HEADS, HEAD_DIM)) / 4},
          "o": {"kernel": jax.random.normal(k[1], (HEADS * HEAD_DIM, D)) / 4},
      },
      "mlp": {
          "up": {"kernel": jax.random.normal(k[2], (LAYERS, D, FF)) / 4},
          "down": {"kernel": jax.random.normal(k[3], (LAYERS, FF, D)) / 6},
      },
      "norm": {"scale": jnp.ones((D,))},
  }


def forward(params: dict, x: jax.Array) -> jax.Array:
  """The base model on a (batch, D) input."""
  q = jnp.einsum("bi,ihd->bhd", x, params["attn"]["q"]["kernel"])
  h = x + jnp.tanh(q.reshape(x.shape[0], -1)) @ params["attn"]["o"]["kernel"]
  for layer in range(LAYERS):
    up = params["mlp"]["up"]["kernel"][layer]
    down = params["mlp"]["down"]["kernel"][layer]
    h = h + jnp.tanh(h @ up) @ down
  return h * params["norm"]["scale"]


def loss_fn(params: dict, adapter, batch: dict) -> jax.Array:
  """Mean squared error of the adapted model (merging the adapter)."""
  pred = forward(lorajax.merge(params, adapter), batch["x"])
  return jnp.mean((pred - batch["y"]) ** 2)


def global_batch_numpy(step: int) -> dict:
  """The full batch of one step (every process can make it; each uses a
  slice)."""
  rng = np.random.default_rng(1000 + step)
  x = rng.normal(size=(GLOBAL_BATCH, D)).astype(np.float32)
  y = np.sin(2 * x[:, ::-1]).astype(np.float32)
  return {"x": x, "y": y}


def local_rows(sharding: NamedSharding, n_rows: int) -> slice:
  """The batch rows held by this process's devices under `sharding`."""
  idx = sharding.addressable_devices_indices_map((n_rows, D)).values()
  starts = [i[0].start or 0 for i in idx]
  stops = [n_rows if i[0].stop is None else i[0].stop for i in idx]
  return slice(min(starts), max(stops))


def setup(mesh: jax.sharding.Mesh):
  """Sharded params, adapter, optimizer state and the train step."""
  param_shardings = jax.tree.map(
      lambda s: NamedSharding(mesh, s), PARAM_SPECS,
      is_leaf=lambda x: isinstance(x, P),
  )
  # The base weights are created on their shards (never whole on one host).
  params = jax.jit(init_params, out_shardings=param_shardings)(
      jax.random.key(0))
  adapter = lorajax.init_sharded(
      params, CONFIG, key=jax.random.key(1), param_shardings=param_shardings)
  shardings = lorajax.adapter_shardings(param_shardings, adapter)
  batch_sharding = NamedSharding(mesh, P("data"))
  train = lorajax.make_train_step(
      loss_fn, optax.adam(3e-2),
      param_shardings=param_shardings, adapter_shardings=shardings,
      batch_sharding=batch_sharding,
  )
  opt_state = train.init(adapter)
  return params, adapter, opt_state, train, batch_sharding


def run(mesh: jax.sharding.Mesh, steps: int, checkpoint_dir: str | None = None
        ) -> tuple[list[float], object]:
  """Trains `steps` steps; returns the losses and the final adapter."""
  params, adapter, opt_state, train, batch_sharding = setup(mesh)
  rows = local_rows(batch_sharding, GLOBAL_BATCH)
  losses = []
  for step in range(steps):
    local = jax.tree.map(lambda a: a[rows], global_batch_numpy(step))
    batch = lorajax.sharding.global_batch(local, batch_sharding)
    adapter, opt_state, metrics = train.step(params, adapter, opt_state,
                                             batch)
    # The loss is replicated: every process reads its local copy.
    losses.append(float(metrics["loss"].addressable_data(0)))
  if checkpoint_dir is not None:
    with lorajax.CheckpointManager(checkpoint_dir, CONFIG) as mgr:
      mgr.save(steps, adapter, opt_state)
  return losses, adapter


def worker(args: argparse.Namespace) -> None:
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", args.devices_per_process)
  jax.distributed.initialize(
      coordinator_address=args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
  )
  mesh = make_mesh((args.num_processes, args.devices_per_process))
  losses, _ = run(mesh, args.steps, args.checkpoint_dir)
  print(json.dumps({"process": jax.process_index(), "losses": losses}),
        flush=True)
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(num_processes: int = 2, devices_per_process: int = 4,
           steps: int = 3, checkpoint_dir: str | None = None,
           timeout: float = 240.0) -> list[dict]:
  """Starts the worker processes and returns their JSON reports."""
  coordinator = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  procs = []
  for i in range(num_processes):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker",
           "--coordinator", coordinator, "--process-id", str(i),
           "--num-processes", str(num_processes),
           "--devices-per-process", str(devices_per_process),
           "--steps", str(steps)]
    if checkpoint_dir:
      cmd += ["--checkpoint-dir", checkpoint_dir]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  reports = []
  try:
    for i, p in enumerate(procs):
      out, err = p.communicate(timeout=timeout)
      if p.returncode != 0:
        raise RuntimeError(
            f"process {i} failed ({p.returncode}):\n{err[-3000:]}")
      reports.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for p in procs:  # A hang must fail, never block: kill what is left.
      if p.poll() is None:
        p.kill()
        p.communicate()
  return reports


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--worker", action="store_true")
  parser.add_argument("--coordinator", default="")
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--devices-per-process", type=int, default=4)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--checkpoint-dir", default=None)
  args = parser.parse_args()
  if args.worker:
    worker(args)
    return
  ckpt = args.checkpoint_dir or tempfile.mkdtemp(prefix="lorajax_multihost_")
  for r in launch(args.num_processes, args.devices_per_process, args.steps,
                  ckpt):
    print(f"process {r['process']}: losses {r['losses']}")
  print(f"checkpoint of step {args.steps} saved in {ckpt}")


if __name__ == "__main__":
  main()
