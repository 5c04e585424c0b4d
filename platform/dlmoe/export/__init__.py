"""Export: the official LLaDA-MoE Hugging Face format.

Lives here: the state-dict adapters ``to_hf`` / ``from_hf``, config.json and the folder reader ``load_pretrained``
(hf.py); the folder writers ``save_pretrained`` / ``write_folder`` (writer.py); the checkpoint exporter, which
stitches a training checkpoint of any expert-parallel size into such a folder (checkpoint.py); folders at s3://
URIs (remote.py). May import torch,
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
    to_hf,
)
from dlmoe.export.writer import save_pretrained, verify_folder, write_folder

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
