"""Masked diffusion: the training objective (objective.py), its noise (noise.py), generation (sampler.py) and the
Monte-Carlo likelihood of a continuation (likelihood.py).

May import: torch and ``dlmoe.model`` — never ray, deepspeed, mlflow or data_pipeline.
"""

from dlmoe.diffusion.likelihood import LikelihoodSettings, continuation_log_likelihood
from dlmoe.diffusion.noise import Noise, cut_length, draw_noise, mix_seed
from dlmoe.diffusion.objective import (
    MaskedDiffusionObjective,
    ObjectiveOutput,
    ObjectiveSettings,
    pretrain_loss,
    response_mask,
    sft_loss,
)
from dlmoe.diffusion.sampler import GenerationResult, GenerationSettings, generate

__all__ = [
    "GenerationResult",
    "GenerationSettings",
    "LikelihoodSettings",
    "MaskedDiffusionObjective",
    "Noise",
    "ObjectiveOutput",
    "ObjectiveSettings",
    "continuation_log_likelihood",
    "cut_length",
    "draw_noise",
    "generate",
    "mix_seed",
    "pretrain_loss",
    "response_mask",
    "sft_loss",
]
