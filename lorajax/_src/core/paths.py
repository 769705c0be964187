"""Path strings for pytree leaves: the names that `LoraConfig` regexes match."""

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from lorajax._src.core.typing import PyTree

KeyPath = tuple[Any, ...]


def _key_str(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(keypath: KeyPath) -> str:
  """Joins a JAX key path into the `/`-separated name that configs match.

  Flax NNX wraps every array in a variable whose only child is `value`; that
  trailing component is dropped, so `block_0/up/kernel` names the same weight
  in linen params, a plain dict and an `nnx.split` state.

  Args:
    keypath: A key path from `jax.tree_util.tree_flatten_with_path`.

  Returns:
    The path string, e.g. `"params/Dense_0/kernel"`.
  """
  parts = [_key_str(k) for k in keypath]
  if (
      len(parts) > 1
      and isinstance(keypath[-1], jax.tree_util.GetAttrKey)
      and parts[-1] == "value"
  ):
    parts = parts[:-1]
  return "/".join(parts)


def leaves_with_paths(
    tree: PyTree, is_leaf: Callable[[Any], bool] | None = None
) -> list[tuple[str, Any]]:
  """Returns `(path_str, leaf)` pairs in flattening order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(path_str(p), leaf) for p, leaf in flat]


def iter_examples(paths: Sequence[str], limit: int = 12) -> Iterator[str]:
  """Yields up to `limit` paths, then a line saying how many were left out."""
  yield from paths[:limit]
  if len(paths) > limit:
    yield f"... and {len(paths) - limit} more"


def format_paths(paths: Sequence[str], limit: int = 12) -> str:
  """Formats a list of paths for an error message, one per line."""
  if not paths:
    return "  (none)"
  return "\n".join("  " + p for p in iter_examples(list(paths), limit))
