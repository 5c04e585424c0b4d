"""Export: the official LLaDA-MoE Hugging Face format.

Lives here: the state-dict adapters ``to_hf`` / ``from_hf`` and the model folder writer and reader
``save_pretrained`` / ``write_folder`` / ``load_pretrained`` (hf.py); the checkpoint exporter, which stitches a
training checkpoint of any expert-parallel size into such a folder (checkpoint.py). May import torch,
safetensors, ``dlmoe.model`` and, for the exporter, ``data_pipeline`` (storage, tokenizers) and the checkpoint
layout of ``dlmoe.train``.
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
    verify_folder,
    write_folder,
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
    "verify_folder",
    "write_folder",
]
