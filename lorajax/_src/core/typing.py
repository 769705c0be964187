"""Type aliases shared by every lorajax module (one definition each)."""

from typing import Any, TypeAlias

# A nested structure of arrays (dicts, lists, tuples, registered dataclasses
# such as `LoraWeight`), or of `None` placeholders in an adapter tree.
PyTree: TypeAlias = Any

__all__ = ("PyTree",)
