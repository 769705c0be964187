"""Llama-family decoders (Llama, SmolLM, Mistral, Qwen2) for lorajax.

Example:
  >>> from lorajax.models import llama
  >>> import jax.numpy as jnp
  >>> model, params = llama.from_pretrained(llama.default_model_path())
  >>> tok = model.tokenizer
  >>> prompt = tok.apply_chat_template(
  ...     [{"role": "user", "content": "What is the capital of France?"}])
  >>> ids = jnp.asarray([tok.encode(prompt)])
  >>> tok.decode(model.generate(params, ids, 20)[0])  # doctest: +SKIP
"""

from lorajax._src.models.hf_io import save_pretrained
from lorajax._src.models.llama import (
    REMAT_POLICIES,
    SCAN_MIN_LAYERS,
    LlamaConfig,
    init_params,
    stack_layers,
    unstack_layers,
)
from lorajax._src.models.model import (
    LlamaModel,
    default_model_path,
    from_pretrained,
)
from lorajax._src.models.tokenizer import Tokenizer

__all__ = (
    "REMAT_POLICIES",
    "SCAN_MIN_LAYERS",
    "LlamaConfig",
    "LlamaModel",
    "Tokenizer",
    "default_model_path",
    "from_pretrained",
    "init_params",
    "save_pretrained",
    "stack_layers",
    "unstack_layers",
)
