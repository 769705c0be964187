"""`lorajax.plan`: will a LoRA run fit on a TPU slice, and how fast is it?

Compiles one real lorajax train step ahead of time, from the model's shapes
alone, for a TPU topology (which need not be attached; needs `libtpu`:
`pip install "lorajax[tpu]"`) or the local devices, and reports per-chip
memory against HBM, the compiler's step-time estimate, tokens/s, MFU, the
collectives and the compile time. Run it with `JAX_PLATFORMS=cpu` on a
machine without TPUs.

  >>> from lorajax import plan
  >>> report = plan.plan("llama-3.1-8b", topology="v5p:2x2x2",
  ...                    mesh="fsdp=8", batch_size=8, seq_len=4096,
  ...                    rank=16)  # doctest: +SKIP
  >>> report.fits, report.hbm_per_chip_bytes  # doctest: +SKIP
"""

from lorajax._src.app.plan import (
    CHIPS,
    PRESETS,
    Chip,
    PlanError,
    PlanReport,
    collectives,
    parse_mesh,
    plan,
)

__all__ = (
    "CHIPS",
    "PRESETS",
    "Chip",
    "PlanError",
    "PlanReport",
    "collectives",
    "parse_mesh",
    "plan",
)
