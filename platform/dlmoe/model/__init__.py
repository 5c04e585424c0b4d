"""The LLaDA-MoE model in pure torch.

Lives here: ``ModelConfig`` and flavors (config.py), attention and dense blocks (layers.py), the dropless MoE
block (moe.py), the transformer and ``build_model`` (transformer.py), load-balance losses and expert-load
statistics (balance.py).
May import: torch and ``dlmoe.errors`` only — never ray, deepspeed, mlflow or data_pipeline. The parallelize
step in ``dlmoe.parallel`` wraps this model; the model knows nothing of it.
"""

from dlmoe.model.config import ModelConfig, flavor_names, get_flavor
from dlmoe.model.moe import MoEBlock, RouterStats
from dlmoe.model.transformer import DiffusionMoE, ModelOutput, build_model, count_parameters

__all__ = [
    "DiffusionMoE",
    "MoEBlock",
    "ModelConfig",
    "ModelOutput",
    "RouterStats",
    "build_model",
    "count_parameters",
    "flavor_names",
    "get_flavor",
]
