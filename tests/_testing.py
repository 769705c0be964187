"""Helpers shared by the tests (one place; tests never re-implement the
library's predicates)."""

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def perturb(adapter: Any, key: jax.Array, scale: float = 0.3) -> Any:
  """Every adapter array replaced by `scale * N(0, 1)` noise (non-zero `b`)."""
  leaves, treedef = jax.tree.flatten(adapter)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([scale * jax.random.normal(k, x.shape, x.dtype)
                            for k, x in zip(keys, leaves)])


def fallbacks(caught: Any) -> list[str]:
  """The `LoraFallbackWarning` messages among recorded warnings."""
  return [str(w.message) for w in caught
          if issubclass(w.category, lorajax.LoraFallbackWarning)]


def check_matches_merged(fn: Any, params: Any, adapter: Any, *args: Any,
                         strict: bool = True, want_fallback: str | None = None,
                         dense_params: Any = None, rtol: float = 2e-4,
                         atol: float = 2e-5, grad_rtol: float = 1e-3,
                         grad_atol: float = 1e-5, min_effect: float = 1e-2,
                         nonzero_grads: bool = True,
                         merge: Any = None) -> list[str]:
  """`lorajax.lora(fn)` equals `fn(merge(params, adapter))`, value and grad.

  Both paths run jitted as `value_and_grad` of `sum(sin(out))` with respect
  to the adapter. The reference merges into `dense_params` (default
  `params`; pass the dequantized params for a quantized base).

  Args:
    fn: `fn(params, *args)`.
    params: What `lorajax.lora(fn)` gets.
    adapter: A perturbed adapter (its effect on the output must exceed
      `min_effect`, so the check is not vacuous).
    *args: Further arguments of `fn`.
    strict: Passed to `lorajax.lora`.
    want_fallback: When given, some fallback message must contain it; else
      there must be none.
    dense_params: The params the reference merges into.
    rtol: Value tolerance.
    atol: Value tolerance.
    grad_rtol: Gradient tolerance.
    grad_atol: Gradient tolerance, relative to each leaf's peak.
    min_effect: The adapter must move some output by more than this.
    nonzero_grads: Require every reference gradient leaf to be non-zero.
    merge: The reference's merge function (default `lorajax.merge`).

  Returns:
    The fallback messages.
  """
  dense_params = params if dense_params is None else dense_params
  merge = lorajax.merge if merge is None else merge

  def loss(apply):
    def f(ad):
      out = apply(ad)
      return jnp.sum(jnp.sin(out)), out
    return jax.jit(jax.value_and_grad(f, has_aux=True))

  merged = loss(lambda ad: fn(merge(dense_params, ad), *args))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    (_, out_f), g_f = loss(
        lambda ad: lorajax.lora(fn, strict=strict)(params, ad, *args))(adapter)
  msgs = fallbacks(caught)
  if want_fallback is None:
    assert msgs == [], msgs
  else:
    assert any(want_fallback in m for m in msgs), msgs
  (_, out_m), g_m = merged(adapter)
  out_base = jax.jit(lambda p: fn(p, *args))(dense_params)
  assert np.nanmax(np.abs(np.asarray(out_m) - np.asarray(out_base))) > (
      min_effect), "the adapter must change the output"
  np.testing.assert_allclose(out_f, out_m, rtol=rtol, atol=atol)
  leaves_m, leaves_f = jax.tree.leaves(g_m), jax.tree.leaves(g_f)
  assert len(leaves_m) == len(leaves_f)
  for x, y in zip(leaves_m, leaves_f):
    peak = np.abs(np.asarray(x)).max()
    assert peak > 0 or not nonzero_grads
    np.testing.assert_allclose(y, x, rtol=grad_rtol,
                               atol=grad_atol * max(1.0, peak))
  return msgs


@contextlib.contextmanager
def no_fallback() -> Iterator[None]:
  """Turns every `LoraFallbackWarning` inside the block into an error."""
  with warnings.catch_warnings():
    warnings.simplefilter("error", lorajax.LoraFallbackWarning)
    yield


def all_eqns(jaxpr: Any) -> Iterator[Any]:
  """Every equation of a jaxpr and of the jaxprs nested in its params."""
  from lorajax._src.core import jax_compat
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax_compat.jaxprs_in_params(eqn.params):
      yield from all_eqns(sub)


def penzai_llamalike(tie: bool) -> tuple[Any, dict[str, Any], jax.Array]:
  """A tiny penzai llama-like transformer as `(fn, params, tokens)`.

  `fn(params, tokens)` binds the `params` dict (label -> value) into the
  model and returns the logits `(batch, seq, vocabulary)`; `tie` ties the
  embedding table and the logits head. Skips the test without penzai.
  """
  pytest.importorskip("penzai")
  from penzai import pz
  from penzai.models.transformer.variants import (
      llamalike_common,
  )

  cfg = llamalike_common.LlamalikeTransformerConfig(
      num_kv_heads=2, query_head_multiplier=2, embedding_dim=16,
      projection_dim=4, mlp_hidden_dim=24, num_decoder_blocks=2,
      vocab_size=11, mlp_variant="swiglu", tie_embedder_and_logits=tie,
      parameter_dtype=jnp.float32, activation_dtype=jnp.float32)
  model = llamalike_common.build_llamalike_transformer(
      cfg, init_base_rng=jax.random.key(0))
  unbound, values = pz.unbind_params(model, freeze=True)
  params = {v.label: v.value for v in values}

  def fn(params, tokens):
    vs = [dataclasses.replace(v, value=params[v.label]) for v in values]
    out = pz.bind_variables(unbound, vs)(pz.nx.wrap(tokens, "batch", "seq"))
    return out.unwrap("batch", "seq", "vocabulary")

  tokens = jnp.array([[1, 5, 2, 9, 3], [0, 4, 4, 10, 7]])
  return fn, params, tokens
