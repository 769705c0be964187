"""Quantized frozen bases: formats, the quantized matmul, lora, LoftQ, GGUF."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lorajax
from lorajax._src.core import quant
from lorajax.models import llama

# The 16 NF4 levels as printed in the QLoRA paper (Dettmers et al. 2023,
# appendix E) and in bitsandbytes' NF4 table, typed in here.
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
DN = (((1,), (0,)), ((), ()))  # x @ W


def _w(shape, seed=0, scale=0.05):
  return scale * jax.random.normal(jax.random.key(seed), shape)


def test_nf4_levels_are_the_papers():
  np.testing.assert_allclose(quant.NF4_LEVELS, PAPER_NF4, atol=2e-7, rtol=0)


def _unpack_ref(codes, block):
  """Numpy: (d/2, out) packed bytes -> (d, out) codes, GGUF nibble order."""
  c = np.asarray(codes).reshape(-1, block // 2, codes.shape[-1])
  return np.concatenate([c & 15, c >> 4], axis=1).reshape(-1, codes.shape[-1])


def test_nf4_blocks_match_a_numpy_reference():
  w = np.asarray(_w((256, 48)), np.float64)
  q = lorajax.quantize({"kernel": jnp.asarray(w, jnp.float32)}, "nf4",
                       min_size=0)["kernel"]
  # Reference: blocks of 64 along the input axis, absmax, nearest level.
  blocks = w.reshape(4, 64, 48)
  absmax = np.abs(blocks).max(axis=1)
  normed = blocks / absmax[:, None, :]
  ref = np.abs(normed[..., None] - np.array(PAPER_NF4)).argmin(-1)
  np.testing.assert_allclose(np.asarray(q.scales), absmax, rtol=1e-6)
  np.testing.assert_array_equal(_unpack_ref(q.codes, 64),
                                ref.reshape(256, 48))
  deq = np.array(PAPER_NF4)[ref] * absmax[:, None, :]
  np.testing.assert_allclose(quant.dequantize(q), deq.reshape(256, 48),
                             atol=1e-6)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_gguf_formats_match_the_gguf_reference(fmt):
  import gguf
  from gguf.quants import dequantize as ref_deq
  from gguf.quants import quantize as ref_q

  qt = getattr(gguf.GGMLQuantizationType, fmt.upper())
  w = np.asarray(_w((24, 128), seed=1), np.float32)  # torch layout (out, in)
  ref = ref_deq(ref_q(w, qt), qt)
  # lorajax kernel layout (in, out): blocks along axis -2.
  q = quant.quantize_array(jnp.asarray(w.T), fmt, axis=-2)
  np.testing.assert_allclose(quant.dequantize(q), ref.T, atol=1e-6, rtol=0)


BOUND = {  # max |w - dequantize(quantize(w))| / (per-block absmax)
    "nf4": float(np.max(np.diff(PAPER_NF4))) / 2 + 1e-6,  # widest gap / 2
    "int8": 0.5 / 127 + 1e-6,
    "q8_0": 0.5 / 127 + 2e-3,  # + float16 rounding of d
    "q4_0": 1 / 8 + 1e-2,  # d = absmax/8; error <= d (llama.cpp's rounding)
    "q4_1": 1 / 15 + 1e-2,  # d <= 2*absmax/15; error <= d/2
}


@pytest.mark.parametrize(
    "fmt,dq", [(f, False) for f in sorted(BOUND)] + [("nf4", True)],
    ids=[*sorted(BOUND), "nf4-dq"])
def test_round_trip_error_bounds(fmt, dq):
  w = _w((256, 40), seed=2) * (1 + jnp.arange(40) / 10)  # varied channels
  q = quant.quantize_array(w, fmt, double_quant=dq)
  err = jnp.abs(quant.dequantize(q) - w)
  block = 256 if fmt == "int8" else q.block
  amax = jnp.max(jnp.abs(w.reshape(-1, block, 40)), axis=1, keepdims=True)
  ratio = (err.reshape(-1, block, 40) / amax).max()
  bound = BOUND[fmt] + (2e-3 if dq else 0)
  assert float(ratio) <= bound, (fmt, float(ratio))
  assert float(ratio) > 0.3 * BOUND[fmt]  # the bound is not vacuous
  bits = 8 * q.nbytes / w.size
  expect = {"nf4": 4.5, "int8": 8.13, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0}
  assert bits <= (4.2 if dq else expect[fmt]), bits


def test_double_quant_saves_memory_and_stays_close():
  w = _w((1024, 512), seed=3)
  q1 = quant.quantize_array(w, "nf4")
  q2 = quant.quantize_array(w, "nf4", double_quant=True)
  assert q2.scales.dtype == jnp.int8
  saved = 8 * (q1.nbytes - q2.nbytes) / w.size
  assert 0.3 < saved < 0.4  # QLoRA: ~0.37 bits per parameter.
  np.testing.assert_allclose(quant.block_scales(q2), q1.scales, rtol=0,
                             atol=float(jnp.max(q1.scales)) / 100)


def test_quantize_per_regex_and_errors():
  params = {"a": {"kernel": _w((128, 64))}, "b": {"kernel": _w((64, 64))},
            "emb": {"embedding": _w((100, 64))}, "n": {"scale": jnp.ones(64)}}
  q = lorajax.quantize(params, {"a/.*": "nf4", "emb/.*": "q8_0",
                                "b/.*": None})
  assert q["a"]["kernel"].format == "nf4" and q["a"]["kernel"].axis == -2
  assert q["emb"]["embedding"].format == "q8_0"
  assert q["emb"]["embedding"].axis == -1  # tables: blocks along features
  assert q["b"]["kernel"] is params["b"]["kernel"]
  assert q["n"]["scale"] is params["n"]["scale"]
  with pytest.raises(ValueError, match=r"'a/kernel'.*not a multiple of 'nf4'"):
    lorajax.quantize({"a": {"kernel": _w((96, 64))}}, "nf4", min_size=0)
  with pytest.raises(ValueError, match="fullmatch no leaf"):
    lorajax.quantize(params, {"zzz": "nf4"})
  with pytest.raises(ValueError, match="Unknown quantization format"):
    lorajax.quantize(params, "nf3")
  with pytest.raises(ValueError, match="double_quant"):
    quant.quantize_array(_w((64, 8)), "int8", double_quant=True)


def test_qdot_gradient_saves_codes_not_a_dense_weight():
  q = quant.quantize_array(_w((256, 96)), "nf4")
  x = jax.random.normal(jax.random.key(5), (4, 256))
  y, vjp = jax.vjp(lambda x: quant.qdot(x, q, dimension_numbers=DN), x)
  saved = jax.tree.leaves(vjp)
  assert not any(s.shape == (256, 96) and jnp.issubdtype(s.dtype, jnp.floating)
                 for s in saved), [(s.shape, s.dtype) for s in saved]
  w = quant.dequantize(q)
  np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)
  g = jnp.cos(y)
  np.testing.assert_allclose(vjp(g)[0], g @ w.T, rtol=1e-5, atol=1e-5)


# -- lorajax.lora on a quantized base ------------------------------------------

CFG = llama.LlamaConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128,
    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
    tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tiny():
  params = llama.init_params(CFG, key=jax.random.key(0))
  return llama.LlamaModel(CFG), params


def _perturbed(adapter, seed=1):
  def one(n):
    if n is None:
      return n
    k = jax.random.fold_in(jax.random.key(seed), n.b.size)
    return dataclasses.replace(n, b=0.05 * jax.random.normal(k, n.b.shape))
  return jax.tree.map(one, adapter, is_leaf=lambda n: n is None
                      or lorajax.is_lora(n))


@pytest.mark.parametrize("fmt,dq", [("nf4", True), ("q4_1", False)],
                         ids=["nf4dq", "q4_1"])
def test_factored_on_quantized_base_equals_merged_dequantized(tiny, fmt, dq):
  model, params = tiny
  q = lorajax.quantize(params, fmt, double_quant=dq, min_size=0)
  adapter = _perturbed(lorajax.init(q, lorajax.LoraConfig(rank=4, alpha=8.0),
                                    key=jax.random.key(1)))
  ids = jnp.array([[3, 4, 5, 6, 7, 8]])
  dense = lorajax.quant.dequantize(q)
  f = lorajax.lora(model.apply, strict=True)  # no dense fallback anywhere

  def loss_q(ad):
    return jnp.mean(jnp.sin(f(q, ad, ids)))

  def loss_ref(ad):
    return jnp.mean(jnp.sin(model.apply(lorajax.merge(dense, ad), ids)))

  ref = jax.jit(lambda ad: model.apply(lorajax.merge(dense, ad), ids))
  np.testing.assert_allclose(jax.jit(f)(q, adapter, ids), ref(adapter),
                             atol=2e-5, rtol=1e-5)
  g = jax.jit(jax.grad(loss_q))(adapter)
  g_ref = jax.jit(jax.grad(loss_ref))(adapter)
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-3)


def test_quantized_weight_follows_scan_and_transpose():
  ws = _w((3, 128, 64), seed=7)
  q = {"w": lorajax.quantize({"w": ws}, "nf4", double_quant=True,
                             axes={"w": -2})["w"]}
  dense = quant.dequantize(q["w"])
  x = jax.random.normal(jax.random.key(8), (2, 128))

  def fn(p, x):
    def body(h, w):
      return h, jnp.tanh(h @ w) @ w.T
    return jax.lax.scan(body, x, p["w"])[1]

  ad = lorajax.init({"w": ws}, lorajax.LoraConfig(rank=2, axes={"w": "sio"}),
                    key=jax.random.key(0))
  ad = _perturbed(ad)
  out = jax.jit(lorajax.lora(fn, strict=True))(q, ad, x)
  ref = fn(lorajax.merge({"w": dense}, ad), x)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_unsupported_use_materialises_and_says_so():
  q = {"w": quant.quantize_array(_w((64, 32)), "nf4")}
  fn = lambda p, x: jnp.sum(jnp.exp(p["w"])) * x  # noqa: E731
  ad = jax.tree.map(lambda _: None, {"w": 0})
  with pytest.warns(lorajax.LoraFallbackWarning, match="materialised"):
    out = lorajax.lora(fn)(q, ad, 1.0)
  np.testing.assert_allclose(out, jnp.sum(jnp.exp(quant.dequantize(q["w"]))),
                             rtol=1e-5)
  with pytest.raises(lorajax.LoraFallbackError, match=r"'w'.*exp.*strict"):
    lorajax.lora(fn, strict=True)(q, ad, 1.0)


def test_train_step_memory_stays_below_a_dense_copy():
  cfg = llama.LlamaConfig(
      vocab_size=256, hidden_size=256, intermediate_size=512,
      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
      tie_word_embeddings=True)
  params = llama.init_params(cfg, key=jax.random.key(0))
  model = llama.LlamaModel(cfg)
  dense_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  layer = params["model"]["layers"]["0"]
  layer_bytes = sum(x.nbytes for x in jax.tree.leaves(layer))
  ids = jnp.ones((2, 16), jnp.int32)
  lc = lorajax.LoraConfig(rank=4)
  f = lorajax.lora(model.apply)

  def temps(p):
    ad = lorajax.init(p, lc, key=jax.random.key(1))
    loss = lambda ad, p: jnp.mean(f(p, ad, ids))  # noqa: E731
    c = jax.jit(jax.grad(loss)).lower(ad, p).compile()
    m = c.memory_analysis()
    return m.temp_size_in_bytes, m.argument_size_in_bytes

  t_dense, _ = temps(params)
  t_q, args_q = temps(lorajax.quantize(params, "nf4"))
  assert args_q < dense_bytes / 4
  # Activations as in the dense step, plus at most one layer's weights
  # dequantized at a time: far below a dense float32 copy of the base.
  assert t_q - t_dense <= layer_bytes, (t_q, t_dense, layer_bytes)
  assert t_q < dense_bytes / 2


def test_merge_is_dense_and_unmerge_is_bit_identical(tiny):
  model, params = tiny
  q = lorajax.quantize(params, "nf4", double_quant=True, min_size=0)
  ad = _perturbed(lorajax.init(q, lorajax.LoraConfig(rank=4),
                               key=jax.random.key(2)))
  with pytest.warns(lorajax.quant.QuantizationWarning, match="dense"):
    merged = lorajax.merge(q, ad)
  kernel = merged["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
  assert jnp.asarray(kernel).dtype == jnp.float32
  dense = lorajax.quant.dequantize(q)
  ids = jnp.array([[5, 6, 7, 8]])
  np.testing.assert_allclose(model.apply(merged, ids),
                             model.apply(lorajax.merge(dense, ad), ids),
                             atol=1e-6)
  exported = lorajax.quant.dequantize(merged)  # plain arrays for exports
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(exported))
  back = lorajax.unmerge(merged, ad)
  assert jax.tree.structure(back) == jax.tree.structure(q)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(q)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="already unmerged"):
    lorajax.unmerge(q, ad)


def test_loftq_reduces_the_initial_error():
  k1, k2 = jax.random.split(jax.random.key(3))
  # A weight with a strong low-rank part, as trained weights have.
  w = (0.2 * jax.random.normal(k1, (256, 8)) @ jax.random.normal(k2, (8, 128))
       + _w((256, 128), seed=4))
  params = {"layer": {"kernel": w}}
  cfg = lorajax.LoraConfig(rank=8, alpha=16.0)
  q_plain = lorajax.quantize(params, "nf4")
  err_plain = jnp.linalg.norm(w - lorajax.quant.dequantize(q_plain)["layer"]
                              ["kernel"])
  errs = []
  for iters in (1, 3):
    q, ad = lorajax.quant.loftq(params, cfg, "nf4", key=jax.random.key(0),
                          iters=iters)
    with pytest.warns(lorajax.quant.QuantizationWarning):
      merged = lorajax.quant.dequantize(lorajax.merge(q, ad))
    merged = merged["layer"]["kernel"]
    errs.append(float(jnp.linalg.norm(w - merged)))
  assert errs[0] < 0.95 * float(err_plain), (errs, err_plain)
  assert errs[1] < 0.97 * errs[0]  # more alternations: closer still
  # The adapter trains from there: factored == merged on the LoftQ base.
  x = jax.random.normal(jax.random.key(1), (3, 256))
  fn = lambda p, x: x @ p["layer"]["kernel"]  # noqa: E731
  np.testing.assert_allclose(lorajax.lora(fn, strict=True)(q, ad, x),
                             x @ merged, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="iters"):
    lorajax.quant.loftq(params, cfg, key=jax.random.key(0), iters=0)


def test_sharded_quantized_base_matches_single_device():
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  params = {"up": {"kernel": _w((256, 512))},
            "down": {"kernel": _w((512, 256), seed=1)}}
  specs = {"up": {"kernel": P(None, "model")},
           "down": {"kernel": P("model", None)}}
  q = lorajax.quantize(params, "nf4")
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  q_sh = jax.device_put(q, shardings)  # one sharding per weight (prefix)
  assert q_sh["down"]["kernel"].codes.sharding.spec == P("model", None)
  assert q_sh["down"]["kernel"].scales.sharding.spec == P("model", None)
  assert q_sh["up"]["kernel"].codes.sharding.spec == P(None, "model")
  ad = _perturbed(lorajax.init(q, lorajax.LoraConfig(rank=4),
                               key=jax.random.key(0)))
  ad_sh = lorajax.adapter_shardings(shardings, ad)
  assert ad_sh["up"]["kernel"].b.spec == P(None, "model")
  assert ad_sh["down"]["kernel"].a.spec == P("model", None)

  def fn(p, x):
    return jnp.tanh(x @ p["up"]["kernel"]) @ p["down"]["kernel"]

  x = jax.random.normal(jax.random.key(9), (8, 256))
  f = jax.jit(lorajax.lora(fn, strict=True))
  out = f(q_sh, jax.device_put(ad, ad_sh), x)
  np.testing.assert_allclose(out, lorajax.lora(fn)(q, ad, x), atol=1e-5,
                             rtol=1e-5)


# -- GGUF files kept in their blocks ------------------------------------------


def test_gguf_native_training_matches_dequantize_then_train(tmp_path):
  import test_gguf
  from _llama_testing import tiny_torch_llama

  tm = tiny_torch_llama(tie=True, seed=3)
  test_gguf._write_gguf(tmp_path / "m.gguf", tm, "Q4_1")
  model, qp = llama.from_pretrained(tmp_path / "m.gguf", quantized=True)
  _, dp = llama.from_pretrained(tmp_path / "m.gguf")
  kern = qp["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  assert lorajax.quant.QuantizedWeight is type(kern) and kern.format == "q4_1"
  assert qp["model"]["embed_tokens"]["embedding"].format == "q4_1"
  for a, b in zip(jax.tree.leaves(lorajax.quant.dequantize(qp)),
                  jax.tree.leaves(dp)):
    np.testing.assert_array_equal(a, b)  # the same blocks, bit for bit
  cfg = lorajax.LoraConfig(rank=4, alpha=8.0)
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 256, (2, 12)))
  f = lorajax.lora(model.apply, strict=True)

  def train(params, adapter, steps=3):
    import optax
    opt = optax.adam(1e-2)
    state = opt.init(adapter)

    @jax.jit
    def step(adapter, state):
      def loss(ad):
        logits = f(params, ad, ids[:, :-1])
        return -jnp.mean(jnp.take_along_axis(
            jax.nn.log_softmax(logits), ids[:, 1:, None], -1))
      v, g = jax.value_and_grad(loss)(adapter)
      up, state = opt.update(g, state)
      return optax.apply_updates(adapter, up), state, v

    losses = []
    for _ in range(steps):
      adapter, state, v = step(adapter, state)
      losses.append(float(v))
    return adapter, losses

  a0 = lorajax.init(dp, cfg, key=jax.random.key(0))
  ad_q, l_q = train(qp, a0)
  ad_d, l_d = train(dp, a0)
  np.testing.assert_allclose(l_q, l_d, rtol=1e-5)
  assert l_q[-1] < l_q[0]
  for x, y in zip(jax.tree.leaves(ad_q), jax.tree.leaves(ad_d)):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4)
  with pytest.raises(ValueError, match="float checkpoint directory"):
    llama.from_pretrained(tmp_path, quantized=True)


def test_bfloat16_compute_dequantizes_in_bfloat16():
  q = quant.quantize_array(_w((128, 64)), "q4_1", dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (2, 128)).astype(jnp.bfloat16)
  jaxpr = jax.make_jaxpr(
      lambda x, q: quant.qdot(x, q, dimension_numbers=DN))(x, q)
  assert "f32[128,64]" not in str(jaxpr)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    y = quant.qdot(x, q, dimension_numbers=DN)
  assert y.dtype == jnp.bfloat16


# -- the main job -------------------------------------------------------------


def test_finetune_cli_trains_on_an_int8_base(tmp_path, capsys):
  import json

  import safetensors.numpy
  from _finetune_testing import write_reverse_data, write_tiny_model

  from lorajax._src.app import cli, run_dir

  model = write_tiny_model(tmp_path / "model")
  write_reverse_data(tmp_path / "train.jsonl", 16, seed=0)
  write_reverse_data(tmp_path / "eval.jsonl", 2, seed=1)
  out = tmp_path / "run"
  args = ["finetune", "--model", str(model), "--train",
          str(tmp_path / "train.jsonl"), "--eval",
          str(tmp_path / "eval.jsonl"), "--eval-examples", "2",
          "--max-new-tokens", "3", "--batch-size", "4", "--lr", "2e-2",
          "--rank", "4", "--alpha", "4", "--steps", "6", "--no-progress",
          "--quantize", "int8", "--output", str(out)]
  assert cli.main([*args, "--merged-weights"]) == 0
  assert json.loads((out / "config.json").read_text())["quantize"] == "int8"
  losses = [r["loss"] for r in run_dir.read_metrics(out / "metrics.jsonl")
            if "loss" in r]
  assert losses[-1] < losses[0]
  # The merged export is the int8 base, dequantized, plus the adapter.
  base = safetensors.numpy.load_file(model / "model.safetensors")
  merged = safetensors.numpy.load_file(out / "merged/model.safetensors")
  ad = safetensors.numpy.load_file(out / "adapter/adapter_model.safetensors")
  key = "model.layers.0.mlp.up_proj.weight"  # (out, in)
  w = base[key]
  scale = np.abs(w).max(axis=1, keepdims=True) / 127  # per output channel
  w_int8 = np.clip(np.round(w / scale), -127, 127) * scale
  pre = "base_model.model.model.layers.0.mlp.up_proj"
  delta = ad[pre + ".lora_B.weight"] @ ad[pre + ".lora_A.weight"]
  np.testing.assert_allclose(merged[key], w_int8 + delta, atol=1e-5)
  assert np.abs(merged[key] - w - delta).max() > 1e-6  # really quantized
  for extra, match in ((["--quantize", "gguf"], "is a directory"),
                       (["--quantize", "int8", "--mode", "merged"],
                        "Drop --mode merged")):
    args = ["finetune", "--model", str(model), "--train",
            str(tmp_path / "train.jsonl"), "--steps", "1",
            "--output", str(tmp_path / f"bad{len(extra)}"), *extra]
    assert cli.main(args) != 0
    assert match in capsys.readouterr().err


def test_summary_counts_quantized_weights_at_their_stored_bytes():
  params = {"a": {"kernel": _w((256, 128))}, "n": {"scale": jnp.ones(128)}}
  q = lorajax.quantize(params, "nf4")
  ad = lorajax.init(q, lorajax.LoraConfig(rank=2), key=jax.random.key(0))
  s = lorajax.summary(q, ad)
  assert s.frozen == 256 * 128 + 128
  # 4 bits per weight + a float32 absmax per 64 weights, + the dense norm.
  assert s.frozen_bytes == 256 * 128 // 2 + 4 * 256 * 128 // 64 + 4 * 128
