"""Review of issue 18 from the outside: lookups of one row (a slice, not a
gather) stay factored under `strict=True`, and `"all-linear"` leaves
`emb`/`tok_emb` tables out. Every case is compared with
`fn(lorajax.merge(params, adapter))` in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lorajax
from tests._testing import check_matches_merged, nodes_by_path, perturb

V, D, H = 10, 8, 5


def _setup(axes="io"):
  rng = np.random.default_rng(0)
  params = {"e": rng.normal(size=(V, D)).astype(np.float32),
            "h": (rng.normal(size=(D, H)) / np.sqrt(D)).astype(np.float32)}
  config = lorajax.LoraConfig(rank=2, alpha=4.0, targets="e|h",
                              axes={"e": axes})
  adapter = perturb(lorajax.init(params, config, key=jax.random.key(0)),
                    jax.random.key(1), 0.5)
  return params, adapter


def _decode(p, tok):
  """Greedy decoding with a tied head: one scalar token per step."""
  def step(t, _):
    logits = jnp.tanh(p["e"][t]) @ p["e"].T
    return jnp.argmax(logits).astype(jnp.int32), logits
  return lax.scan(step, tok, None, length=3)[1]


# Each reads one row (or column) of the table with a scalar id: JAX emits a
# `slice`/`dynamic_slice`, not a gather.
ROW_LOOKUPS = {
    "static_row_elementwise": lambda p, t: 2.0 * jnp.tanh(p["e"][3]),
    "scalar_row_elementwise": lambda p, t: jnp.tanh(p["e"][t]),
    "scalar_column": lambda p, t: jnp.tanh(p["e"][:, t]),
    "dynamic_index_in_dim": lambda p, t: jnp.sin(
        lax.dynamic_index_in_dim(p["e"], t, keepdims=False)),
    "row_returned": lambda p, t: p["e"][t],
    "row_into_adapted_head": lambda p, t: jnp.tanh(p["e"][t]) @ p["h"],
    "row_into_head_raw": lambda p, t: p["e"][t] @ p["h"],
    "row_into_tied_head": lambda p, t: p["e"][t] @ p["e"].T,
    "decode_loop_tied": _decode,
}


@pytest.mark.parametrize("case", sorted(ROW_LOOKUPS))
def test_scalar_row_lookup_stays_factored(case):
  params, adapter = _setup()
  check_matches_merged(ROW_LOOKUPS[case], params, adapter, jnp.array(3),
                       strict=True, nonzero_grads=False)


def test_scalar_row_lookup_of_transposed_table():
  """A penzai-style `(d, vocab)` table read as `w[:, token]`."""
  params, adapter = _setup(axes="oi")
  params = {"e": params["e"].T, "h": params["h"]}
  adapter = perturb(lorajax.init(params, lorajax.LoraConfig(
      rank=2, alpha=4.0, targets="e|h", axes={"e": "oi"}),
      key=jax.random.key(0)), jax.random.key(2), 0.5)
  check_matches_merged(lambda p, t: jnp.tanh(p["e"][:, t]) @ p["h"],
                       params, adapter, jnp.array(7), strict=True)


def test_full_weight_elementwise_still_falls_back():
  """The silent merge is only for rows: a whole weight used elementwise
  is still reported (and raises under `strict=True`)."""
  params, adapter = _setup()
  with pytest.raises(lorajax.LoraFallbackError, match=r"'e'.*`tanh`"):
    lorajax.lora(lambda p: jnp.tanh(p["e"]), strict=True)(params, adapter)
  check_matches_merged(lambda p: jnp.tanh(p["e"][2:5]), params, adapter,
                       strict=False, want_fallback="`tanh`",
                       nonzero_grads=False)


def test_equinox_embedding_on_a_scalar_id():
  eqx = pytest.importorskip("equinox")
  key = jax.random.key(0)
  k1, k2 = jax.random.split(key)
  model = (eqx.nn.Embedding(V, D, key=k1), eqx.nn.Linear(D, H, key=k2))
  params, static = eqx.partition(model, eqx.is_array)
  config = lorajax.LoraConfig(rank=2, alpha=4.0, targets=".*weight",
                              axes={"0/weight": "io", "1/weight": "oi"})
  adapter = perturb(lorajax.init(params, config, key=key),
                    jax.random.key(3), 0.5)

  def fn(p, tok):
    emb, head = eqx.combine(p, static)
    return head(emb(tok))  # no vmap: one token

  check_matches_merged(fn, params, adapter, jnp.array(4), strict=True)


@pytest.mark.parametrize("name", ["emb", "tok_emb", "pos_emb"])
def test_all_linear_leaves_emb_tables_out(name):
  params = {name: {"weight": np.zeros((V, D), np.float32)},
            "blocks": {"0": {"attn": {"wq": {"weight": np.zeros(
                (D, D), np.float32)}}}},
            "time_emb_proj": {"weight": np.zeros((D, D), np.float32)}}
  config = lorajax.LoraConfig(rank=2, targets="all-linear")
  got = set(nodes_by_path(lorajax.init(params, config,
                                       key=jax.random.key(0))))
  assert got == {"blocks/0/attn/wq/weight", "time_emb_proj/weight"}


def _dora_setup(axes="io"):
  params, _ = _setup()
  config = lorajax.LoraConfig(rank=2, alpha=4.0, targets="e|h",
                              use_dora=True, axes={"e": axes})
  adapter = perturb(lorajax.init(params, config, key=jax.random.key(0)),
                    jax.random.key(4), 0.3)
  return params, adapter


def _dora_merge(params, adapter):
  """DoRA in plain jnp: `m * V / stop_gradient(||V||)`, `V = W + s a b`,
  the norm over the input axis (axis 0 of an (in, out) weight)."""
  def one(n, w):
    if n is None:
      return w
    v = w + n.scale * n.a @ n.b
    norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v * v, axis=0)))
    return n.magnitude * v / norm
  return jax.tree.map(one, adapter, params, is_leaf=lorajax.is_lora)


@pytest.mark.parametrize("case", ["tied_head", "scalar_row_tied", "stacked"])
def test_dora_weight_contracted_over_its_output_axis(case):
  """DoRA's magnitude sits on the output axis; a tied head `h @ E.T`
  contracts that axis, so the magnitude scales `h` (no fallback)."""
  params, adapter = _dora_setup()
  fns = {
      "tied_head": lambda p, i: jnp.tanh(p["e"][i] @ p["h"]) @ p["h"].T,
      "scalar_row_tied": lambda p, i: p["e"][i[0]] @ p["e"].T,
  }
  if case == "stacked":
    rng = np.random.default_rng(5)
    params = {"w": rng.normal(size=(3, D, H)).astype(np.float32)}
    adapter = perturb(lorajax.init(params, lorajax.LoraConfig(
        rank=2, alpha=4.0, targets="w", use_dora=True, axes={"w": "sio"}),
        key=jax.random.key(0)), jax.random.key(6), 0.3)
    x = rng.normal(size=(3, 4, H)).astype(np.float32)

    def stacked(p, x):  # per layer: x_l @ W_l.T, batch over the stack
      return jnp.einsum("lbo,lio->lbi", x, p["w"])

    def ref_merge(params, adapter):
      n = adapter["w"]
      v = params["w"] + n.scale * n.a @ n.b
      norm = jax.lax.stop_gradient(
          jnp.sqrt(jnp.sum(v * v, axis=1, keepdims=True)))
      return {"w": n.magnitude[:, None, :] * v / norm}

    check_matches_merged(stacked, params, adapter, x, strict=True,
                         merge=ref_merge)
    return
  check_matches_merged(fns[case], params, adapter, jnp.array([3, 1, 7]),
                       strict=True, merge=_dora_merge, nonzero_grads=False)


def test_quantized_table_scalar_row():
  """An int8 table read with a scalar id: only that row is dequantized."""
  params, adapter = _setup()
  qp = lorajax.quantize(params, {"e": "int8"}, min_size=16, axes={"e": -1})
  assert lorajax.quant.is_quantized(qp["e"])
  check_matches_merged(lambda p, t: jnp.tanh(p["e"][t]) @ p["h"], qp,
                       adapter, jnp.array(2), strict=True,
                       dense_params=lorajax.quant.dequantize(qp))


@pytest.mark.parametrize("path,selected", [
    ("bert/encoder/layer/0/output/dense/kernel", True),  # BERT FFN down.
    ("bert/encoder/layer/0/attention/output/dense/kernel", True),
    ("output/weight", False),  # llama.cpp's head.
    ("decoder/logits_dense/kernel", False),  # T5X's head.
    ("score/weight", False),  # HF sequence classification.
    ("qa_outputs/weight", False),  # HF question answering.
    ("cls_head/kernel", False),
    ("model/layers/0/mlp/down_proj/kernel", True),
])
def test_all_linear_heads_by_name(path, selected):
  params = {"block": {"mlp": {"up_proj": {"kernel": jnp.ones((4, 3))}}}}
  node = params
  parts = path.split("/")
  for p in parts[:-1]:
    node = node.setdefault(p, {})
  node[parts[-1]] = jnp.ones((4, 3))
  config = lorajax.LoraConfig(rank=1, alpha=1.0, targets="all-linear")
  adapter = lorajax.init(params, config=config, key=jax.random.key(0))
  node = adapter
  for p in parts:
    node = node.get(p) if isinstance(node, dict) else None
  assert isinstance(node, lorajax.LoraWeight) == selected, path
  assert isinstance(adapter["block"]["mlp"]["up_proj"]["kernel"],
                    lorajax.LoraWeight)
