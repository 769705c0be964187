"""Sharded LoRA: adapter shardings, sharded init, global batches, axes.

`adapter_shardings` derives the adapter's shardings from the base weights',
`init_sharded` creates the adapter on its devices, `global_batch` assembles a
global batch from each process's slice, and `infer_axes` reads each weight's
stacked/input/output axes from a forward function. The train step
(`lorajax.make_train_step`) takes the shardings.
"""

from lorajax._src.core.factored import infer_axes
from lorajax._src.core.sharding import (
    adapter_shardings,
    global_batch,
    init_sharded,
)

__all__ = ("adapter_shardings", "global_batch", "infer_axes", "init_sharded")
