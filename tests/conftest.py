"""Test set-up: 8 simulated CPU devices, before JAX starts computing."""

import os

os.environ.setdefault("XLA_FLAGS", "")
import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
