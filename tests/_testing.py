"""Helpers shared by the tests (one place; tests never re-implement the
library's predicates)."""

from typing import Any

import jax

import lorajax


def path_of(keypath: Any) -> str:
  """`a/b/c` name of a JAX key path (as `LoraConfig` regexes see it for
  dicts and linen params)."""
  return jax.tree_util.keystr(keypath, simple=True, separator="/")


def nodes_by_path(adapter: Any) -> dict[str, lorajax.LoraWeight]:
  """`{path: LoraWeight}` of the adapted weights of an adapter tree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(adapter,
                                                 is_leaf=lorajax.is_node)
  return {path_of(p): n for p, n in flat if n is not None}


def leaves_by_path(tree: Any) -> dict[str, Any]:
  """`{path: leaf}` of a pytree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_of(p): x for p, x in flat}
