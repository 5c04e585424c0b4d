"""Export: the official LLaDA-MoE Hugging Face format.

Lives here: the state-dict adapters ``to_hf`` / ``from_hf`` and the model folder writer and reader
``save_pretrained`` / ``load_pretrained`` (hf.py). May import torch, safetensors and ``dlmoe.model``.
"""

from dlmoe.export.hf import (
    config_from_hf,
    config_to_hf,
    from_hf,
    hf_tensor_shapes,
    load_config,
    load_pretrained,
    model_from_state,
    read_dlmoe_facts,
    save_pretrained,
    to_hf,
)

__all__ = [
    "config_from_hf",
    "config_to_hf",
    "from_hf",
    "hf_tensor_shapes",
    "load_config",
    "load_pretrained",
    "model_from_state",
    "read_dlmoe_facts",
    "save_pretrained",
    "to_hf",
]
