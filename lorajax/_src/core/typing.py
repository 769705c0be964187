"""Type aliases shared by every lorajax module.

Array shapes are annotated with jaxtyping, e.g. `Float[Array, "*b d_in"]`:
one name per axis, `*name` for any number of axes, `...` for anything. The
annotations are documentation and type-checker input (a type checker reads
`Float[Array, ...]` as `jax.Array`); nothing checks them at run time, so they
cost nothing. To check them, wrap a function:
`jaxtyping.jaxtyped(fn, typechecker=beartype.beartype)` checks every call's
dtypes and shapes and that the named axes agree between arguments and result
(tests/test_typing.py does this for the core's array functions). jaxtyping's
whole-package import hook (`pytest --jaxtyping-packages=...`) also checks the
fields of pytree dataclasses such as `LoraWeight`, which legitimately hold
`jax.ShapeDtypeStruct` leaves under `jax.eval_shape`, so it is not used.

Axis names used in the core: `rank` the LoRA rank; `*weight` all axes of an
adapted weight; `*x` all axes of an activation; `*a_axes` / `*b_axes` the
axes a weight shares with its `a` / `b` factor.
"""

from typing import Any

from jaxtyping import Array, Float, Integer, PRNGKeyArray

PyTree = Any
"""Any pytree (a nested structure of containers with array leaves)."""

__all__ = ["Array", "Float", "Integer", "PRNGKeyArray", "PyTree"]
