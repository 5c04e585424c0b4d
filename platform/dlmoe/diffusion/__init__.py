"""Masked diffusion: the training objective (objective.py), its noise (noise.py), and later the sampler.

May import: torch and ``dlmoe.model`` — never ray, deepspeed, mlflow or data_pipeline.
"""

from dlmoe.diffusion.noise import Noise, cut_length, draw_noise, mix_seed
from dlmoe.diffusion.objective import (
    MaskedDiffusionObjective,
    ObjectiveOutput,
    ObjectiveSettings,
    pretrain_loss,
    response_mask,
    sft_loss,
)

__all__ = [
    "MaskedDiffusionObjective",
    "Noise",
    "ObjectiveOutput",
    "ObjectiveSettings",
    "cut_length",
    "draw_noise",
    "mix_seed",
    "pretrain_loss",
    "response_mask",
    "sft_loss",
]
