"""The target presets: which weight names mean a linear layer.

`LoraConfig(targets="all-linear" | "attention" | "mlp")` decides from a
weight's path string alone. A path is first read as *module path + weight
name* by the naming-family table `FAMILIES` (flax `kernel`, PyTorch/equinox
`weight`, haiku/gemma `w`, penzai `<name>.weights`, gemma's bare
feed-forward params, fused expert banks); the presets then look at the
module name and the parts above it. docs/core.md renders the same table.

Selection by use (`lorajax.select_linear`, which traces the model) lives in
`select.py`; this module never traces.
"""

import dataclasses
import re
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Family:
  """One naming family: how its linear weights are spelled.

  Attributes:
    name: Short name shown by `lorajax.summary`.
    libraries: Who names weights this way (for the docs).
    leaf: Regex fullmatching the last path part (after penzai's trailing
      `data_array` is dropped).
    module_from_leaf: The module name is the leaf itself (`gating_einsum`),
      or the leaf with this suffix removed (`query.weights` -> `query`);
      `None`: the module name is the part above the leaf (`q_proj/kernel`).
    parent: Regex the part above the leaf must fullmatch, or `None`.
    example: An example path.
  """

  name: str
  libraries: str
  leaf: str
  example: str
  module_from_leaf: str | None = None
  parent: str | None = None


# Names of the module of a weight in `"attention"` / `"mlp"`.
ATTENTION_NAMES = (
    "q", "k", "v", "o", "q_proj", "k_proj", "v_proj", "o_proj", "query",
    "key", "value", "out", "out_proj", "qkv", "qkv_proj", "c_attn", "c_proj",
    "wq", "wk", "wv", "attn_q", "attn_k", "attn_v", "attn_output",
    "query_key_value", "dense",
    # gemma (google-deepmind/gemma `Attention`).
    "q_einsum", "kv_einsum", "qkv_einsum", "attn_vec_einsum",
    # keras / keras-hub attention layers; equinox `MultiheadAttention`.
    "attention_output", "query_proj", "key_proj", "value_proj",
    "output_proj",
)
MLP_NAMES = (
    "up", "down", "gate", "up_proj", "down_proj", "gate_proj", "gate_up_proj",
    "wi", "wi_0", "wi_1", "wo", "fc1", "fc2", "c_fc", "w1", "w2", "w3",
    "dense_h_to_4h", "dense_4h_to_h", "ffn_up", "ffn_down", "ffn_gate",
    "mlp_in", "mlp_out",
    # gemma `FeedForward` (its params sit directly in `mlp`).
    "gating_einsum",
    # penzai llamalike / GPT-NeoX feed-forward.
    "gating_linear", "value_linear", "out_linear",
    # keras-hub Llama/Mistral/Mixtral, Gemma decoder blocks, Mixtral experts.
    "feedforward_intermediate_dense", "feedforward_gate_dense",
    "feedforward_output_dense", "sparse_feedforward_gate_dense",
    "ffw_gating", "ffw_gating_2", "ffw_linear",
    "expert_feedforward_gate_dense", "expert_feedforward_intermediate_dense",
    "expert_feedforward_output_dense",
)
# An `output` module directly under one of these is the attention output
# projection (penzai `attention/output.weights`, BERT `attention/output`),
# not the model's output head.
ATTENTION_PARTS = ("attention", "attn", "self_attn", "self_attention",
                   "cross_attention", "cross_attn", "encdec_attention")
# penzai's GPT-NeoX MLP names its projections `in` and `out` (`mlp/in`).
_MLP_PARTS = ("mlp", "ffw", "ffn", "feed_forward", "feedforward")

# A part containing `embed`/`wte`/`wpe`/`token_embd`, or named `emb` or
# ending in `_emb` (`tok_emb`, `pos_emb`: equinox / nanoGPT-style code).
EMBED_PART = re.compile(
    r".*(?:embed|embedding|wte|wpe|token_embd).*|(?:\w+_)?emb", re.I)
# Output heads: `lm_head`, `head`, `*_head`, `output`, `classifier`, HF's
# `score` (sequence classification) and `qa_outputs`, T5X's `logits_dense`.
HEAD_NAMES = ("lm_head", "head", "*_head", "output", "classifier", "score",
              "qa_outputs", "logits_dense")
_HEAD_PART = re.compile(
    r"(?:\w+_)?head|output|classifier|score|qa_outputs|logits(?:_dense)?",
    re.I)

FAMILIES = (
    Family("kernel", "flax linen and nnx, keras and keras-hub, "
           "`lorajax.models.llama`", r"kernel",
           "model/layers/0/self_attn/q_proj/kernel"),
    Family("weight", "PyTorch / Hugging Face / PEFT state dicts, equinox",
           r"weight", "model/layers/0/mlp/experts/3/w1/weight"),
    Family("w", "haiku, gemma attention (`attn/q_einsum/w`), plain dicts",
           r"w", "layer_0/attn/kv_einsum/w"),
    Family("penzai", "penzai (`pz.unbind_params` labels; NamedArray"
           " `data_array`)", r".+\.weights", "transformer/block_0/"
           "attention/query.weights/data_array",
           module_from_leaf=".weights"),
    Family("penzai", "penzai, labels of plain arrays", r"weights",
           "transformer/block_0/mlp/Linear_0/weights"),
    Family("gemma mlp", "gemma `FeedForward` (params directly in `mlp`)",
           r"gating_einsum|linear", "layer_0/mlp/gating_einsum",
           module_from_leaf="", parent=r"mlp|ffw|feed_forward"),
    Family("expert bank", "fused MoE expert weights: keras-hub Mixtral"
           " (`experts/expert_feedforward_gate_dense`), Hugging Face"
           " `experts/gate_up_proj`",
           r"expert_feedforward_\w+|gate_up_proj|down_proj|up_proj|gate_proj"
           r"|w1|w2|w3",
           "decoder_0/moe/experts/expert_feedforward_output_dense",
           module_from_leaf="", parent=r"experts|expert_bank"),
)


@dataclasses.dataclass(frozen=True)
class Split:
  """A path read as module parts + module name by one `Family`."""

  family: Family
  parents: tuple[str, ...]  # parts above the module
  module: str


def split(path: str) -> Split | None:
  """Reads `path` as a linear weight name; `None` if no family matches."""
  parts = path.split("/")
  if len(parts) > 1 and parts[-1] == "data_array":  # penzai NamedArray
    parts = parts[:-1]
  leaf = parts[-1]
  for fam in FAMILIES:
    if not re.fullmatch(fam.leaf, leaf):
      continue
    if fam.parent is not None and not (
        len(parts) > 1 and re.fullmatch(fam.parent, parts[-2])):
      continue
    if fam.module_from_leaf is None:
      if len(parts) < 2:  # A bare `{"w": ...}`: no module name.
        return Split(fam, (), "")
      return Split(fam, tuple(parts[:-2]), parts[-2])
    module = leaf.removesuffix(fam.module_from_leaf)
    return Split(fam, tuple(parts[:-1]), module)
  return None


def _is_head(s: Split) -> str | None:
  """The part that makes `s` an output head, or None."""
  names = (*s.parents, s.module)
  for j, part in enumerate(names):
    if not _HEAD_PART.fullmatch(part):
      continue
    if part.lower() == "output" and (
        j < len(names) - 1 or (j > 0 and names[j - 1] in ATTENTION_PARTS)):
      # A part above the module (BERT's `output/dense`, the feed-forward's
      # down projection) or the attention's output projection.
      continue
    return part
  return None


def match(preset: str, path: str, ndim: int, dtype: Any) -> tuple[bool, str]:
  """Whether `preset` selects the weight, and the rule that decided.

  Args:
    preset: `"all-linear"`, `"attention"` or `"mlp"`.
    path: The weight's path string.
    ndim: The weight's number of axes.
    dtype: The weight's dtype.

  Returns:
    `(selected, why)`: `why` names the family and module that matched, or
    the reason the weight was left out.
  """
  s = split(path)
  if preset == "all-linear":
    if ndim < 2:
      return False, "fewer than 2 axes"
    if not jnp.issubdtype(dtype, jnp.floating):
      return False, f"not floating point ({jnp.dtype(dtype).name})"
    parts = path.split("/")
    emb = next((p for p in parts if EMBED_PART.fullmatch(p)), None)
    if emb is not None:
      return False, f"embedding table (part {emb!r})"
    if s is None:
      return False, "not a linear weight name (see the naming table)"
    head = _is_head(s)
    if head is not None:
      return False, f"output head (part {head!r})"
    return True, f"all-linear ({s.family.name})"
  if s is None:
    return False, "not a linear weight name (see the naming table)"
  attention = s.module in ATTENTION_NAMES or (
      s.module == "output" and bool(s.parents)
      and s.parents[-1] in ATTENTION_PARTS)
  mlp = s.module in MLP_NAMES or s.family.name == "gemma mlp" or (
      s.family.name == "penzai" and s.module in ("in", "out")
      and bool(s.parents) and s.parents[-1] in _MLP_PARTS)
  hit = attention if preset == "attention" else mlp
  if hit:
    return True, f"{preset} ({s.family.name} {s.module!r})"
  if attention or mlp:
    other = "attention" if attention else "mlp"
    return False, f"{s.module!r} is an {other} projection"
  return False, f"module {s.module!r} is not a known {preset} projection"


def family_table_markdown() -> str:
  """The naming-family table of docs/core.md (kept in sync by a test)."""
  lines = ["| family | weight name (last path part) | module name | used by"
           " | example |", "|---|---|---|---|---|"]
  for f in FAMILIES:
    if f.module_from_leaf is None:
      module = "the part above"
    elif f.module_from_leaf:
      module = f"the part without `{f.module_from_leaf}`"
    else:
      module = "the weight name itself"
    if f.parent:
      module += " (under `{}`)".format(f.parent.replace("|", "\\|"))
    leaf = f.leaf.replace("|", "\\|")
    lines.append(f"| {f.name} | `{leaf}` | {module} | {f.libraries} |"
                 f" `{f.example}` |")
  return "\n".join(lines) + "\n"
