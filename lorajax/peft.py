"""Hugging Face PEFT interop: LoRA adapters in both directions.

`save` writes a lorajax adapter as a PEFT LoRA directory
(adapter_config.json + adapter_model.safetensors) that
`peft.PeftModel.from_pretrained(base, directory)` loads unchanged; `load`
reads such a directory (also one written by PEFT) into a lorajax adapter.
Only JSON and safetensors are read or written.

Example:
  >>> import jax, lorajax, lorajax.peft
  >>> from lorajax.models import llama
  >>> config = llama.LlamaConfig(vocab_size=64, hidden_size=32,
  ...     intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
  >>> params = llama.init_params(config, key=jax.random.key(0))
  >>> adapter = lorajax.init(params, lorajax.LoraConfig(rank=4),
  ...                        key=jax.random.key(1))
  >>> import tempfile, os
  >>> d = os.path.join(tempfile.mkdtemp(), "adapter")
  >>> lorajax.peft.save(d, adapter, base_model_name_or_path="my-base")
  >>> sorted(os.listdir(d))
  ['adapter_config.json', 'adapter_model.safetensors']
  >>> loaded = lorajax.peft.load(d, params)
"""

from lorajax._src.core.methods import to_lora
from lorajax._src.core.peft import load, save

__all__ = ("load", "save", "to_lora")
