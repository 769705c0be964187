"""Many adapters on one base model (multi-tenant training and serving).

An `AdapterSet` stacks adapters for the same params along a slot axis
(ranks padded with zeros to the largest). `lora(fn)(params, aset.weights,
ids, *args)` runs every example with its own adapter (`BASE_ID` for none) in
one compiled program; `per_slot(tx)` trains several adapters in one step,
each with its own optimizer state; `replace` hot-swaps a slot without
recompiling; `add_weighted_adapter` combines adapters as PEFT does.
See docs/multi_adapter.md.
"""

from lorajax._src.core.multi import (
    BASE_ID,
    AdapterSet,
    LoraSetWeight,
    SlotInfo,
    active_slots,
    add,
    add_weighted_adapter,
    build,
    dare_mask,
    load,
    lora,
    per_slot,
    remove,
    replace,
    save,
)

__all__ = (  # noqa: RUF022 (plain sorted order, as tests/test_api.py checks)
    "AdapterSet",
    "BASE_ID",
    "LoraSetWeight",
    "SlotInfo",
    "active_slots",
    "add",
    "add_weighted_adapter",
    "build",
    "dare_mask",
    "load",
    "lora",
    "per_slot",
    "remove",
    "replace",
    "save",
)
