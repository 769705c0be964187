"""Deprecated public names: a module `__getattr__` that warns (optax style).

A removed name keeps working until the version given, returning the same
object as before, with a `DeprecationWarning` that names the replacement.
"""

import warnings
from collections.abc import Callable, Mapping
from typing import Any


def deprecation_getattr(
    module: str, deprecations: Mapping[str, tuple[str, Callable[[], Any]]]
) -> Callable[[str], Any]:
  """A module-level `__getattr__` for deprecated names.

  Args:
    module: The module's name, for the `AttributeError` of unknown names.
    deprecations: Maps each deprecated name to `(message, get)`: the warning
      text (what to use instead, and the version that removes the name) and
      a function returning the object.

  Returns:
    The `__getattr__` function to assign in the module.
  """

  def __getattr__(name: str) -> Any:
    if name in deprecations:
      message, get = deprecations[name]
      warnings.warn(message, DeprecationWarning, stacklevel=2)
      return get()
    raise AttributeError(f"module {module!r} has no attribute {name!r}")

  return __getattr__
