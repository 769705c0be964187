"""The core's jaxtyping shape annotations match the arrays that flow through.

Nothing checks the annotations in normal use. Here the annotated core
functions are wrapped with `jaxtyping.jaxtyped(typechecker=beartype)`, which
checks every call's dtypes and the consistency of the named axes, and driven
through merge and the factored transform on stacked, multi-axis and 2-D
weights; the results are compared with dense reference math.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax._src.core import adapter as adapter_lib
from lorajax._src.core import lora_kind

beartype = pytest.importorskip("beartype")
jaxtyping = pytest.importorskip("jaxtyping")

_CHECKED = {
    adapter_lib: ("delta",),
    lora_kind: ("low_rank_contract",),
}


@pytest.fixture
def checked(monkeypatch):
  """Runs the test with the annotated core functions type-checked."""
  for module, names in _CHECKED.items():
    for name in names:
      fn = getattr(module, name)
      monkeypatch.setattr(module, name, jaxtyping.jaxtyped(
          fn, typechecker=beartype.beartype))


def _perturbed(params, config, key):
  adapter = lorajax.init(params, config, key=jax.random.key(key))
  # A non-zero `b`, so that the adapter changes the result.
  return jax.tree.map(
      lambda n: dataclasses.replace(
          n, b=0.3 * jax.random.normal(jax.random.key(key + 1), n.b.shape)),
      adapter, is_leaf=lorajax.is_lora)


def test_annotations_are_not_checked_by_default():
  assert not hasattr(adapter_lib.delta, "__wrapped__")
  assert not hasattr(lora_kind.low_rank_contract, "__wrapped__")


def test_checked_contraction_rejects_a_non_float_input(checked):
  del checked
  x = jnp.ones((3, 4), jnp.int32)
  a, b = jnp.ones((4, 2)), jnp.ones((5, 2))
  with pytest.raises(jaxtyping.TypeCheckError, match="x"):
    lora_kind.low_rank_contract("bi", x, "ir", a, "or", b, "bo", scale=1.0,
                                precision=None, preferred_element_type=None)


def test_merge_and_factored_match_dense_math_under_checks(checked):
  del checked
  k = jax.random.split(jax.random.key(0), 4)
  params = {
      "stack": jax.random.normal(k[0], (3, 6, 5)),   # axes "sio"
      "heads": jax.random.normal(k[1], (6, 2, 4)),   # axes "ioo"
      "w": jax.random.normal(k[2], (6, 7)),          # axes "io"
  }
  config = lorajax.LoraConfig(rank=2, alpha=4.0, targets=".*",
                              axes={"stack": "sio", "heads": "ioo"})
  adapter = _perturbed(params, config, key=5)
  x = jax.random.normal(k[3], (2, 6))

  # Dense reference, written out per weight.
  def dense(name, node):
    a, b = np.asarray(node.a), np.asarray(node.b)
    if name == "stack":
      return params[name] + node.scale * np.einsum("sir,sro->sio", a, b)
    if name == "heads":
      return params[name] + node.scale * np.einsum("ir,rhd->ihd", a, b)
    return params[name] + node.scale * a @ b

  want = {n: dense(n, adapter[n]) for n in params}
  merged = lorajax.merge(params, adapter)
  for n in params:
    np.testing.assert_allclose(merged[n], want[n], rtol=1e-5, atol=1e-5)

  def fn(p, x):
    h = jnp.einsum("bi,sio->bso", x, p["stack"]).sum(1)
    h = h + jnp.einsum("bi,ihd->bhd", x, p["heads"]).reshape(2, 8)[:, :5]
    return jnp.tanh(h) @ p["w"][:5]

  got = jax.jit(lorajax.lora(fn, strict=True))(params, adapter, x)
  np.testing.assert_allclose(got, fn(want, x), rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(got) - np.asarray(fn(params, x))).max() > 1e-2
