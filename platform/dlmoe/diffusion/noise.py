"""Masking noise as a pure function of (seed, epoch, global sample index).

Each sample's t and per-token uniforms come from its own generator, seeded by mixing (seed, epoch, index). So the
noise of a sample does not depend on the rank that holds it, the number of ranks, the micro-batch it lands in, or
how often the run restarted (DESIGN.md §3; reference/lladamoe.md §4 "noise hygiene"). Nothing here runs inside
data-loader workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1

# Separate streams so that t, the token mask, the stratification offset and the length cut never share draws.
_STREAM_SAMPLE = 1
_STREAM_STRATIFY = 2
_STREAM_LENGTH = 3


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (order matters); stable across processes and versions."""
    state = 0
    for part in parts:
        state = _splitmix64(state ^ (part & _MASK64))
    return state >> 1


def _generator(*parts: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(mix_seed(*parts))
    return gen


@dataclass
class Noise:
    """The noise of a batch: ``t_B`` in [0, 1), ``p_mask_B = (1 - eps) t + eps``, and ``uniform_BL``; a token is
    masked when its uniform falls below its sample's ``p_mask``."""

    t_B: torch.Tensor
    p_mask_B: torch.Tensor
    uniform_BL: torch.Tensor

    def masked(self, seq_len: int | None = None) -> torch.Tensor:
        """Boolean mask [B, seq_len] (the first ``seq_len`` positions when the batch was cut)."""
        uniform = self.uniform_BL if seq_len is None else self.uniform_BL[:, :seq_len]
        return uniform < self.p_mask_B[:, None]


def draw_noise(sample_index: torch.Tensor, seq_len: int, *, seed: int, epoch: int, eps: float = 1e-3,
               stratify_batch_size: int | None = None, t_range: tuple[float, float] = (0.0, 1.0)) -> Noise:
    """Noise for the samples with the given global indices [B] (reference §4, pretraining).

    With ``stratify_batch_size`` N, t is stratified across each global batch of N consecutive indices (MDLM):
    ``t_j = (u + j / N) mod 1`` with one u per global batch, j the position of the sample in its global batch.
    A ``t_range`` (t_min, t_max) other than (0, 1) maps t linearly onto it (LLaDA 2.0 / dFactory's noise range,
    e.g. (0.3, 0.8)), before ``p_mask = (1 - eps) t + eps``.
    """
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must lie in [0, 1), got {eps}")
    t_min, t_max = t_range
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"the noise range must satisfy 0 <= t_min < t_max <= 1, got {t_range}")
    indices = [int(i) for i in sample_index.reshape(-1).tolist()]
    t_values: list[float] = []
    uniforms: list[torch.Tensor] = []
    for index in indices:
        if index < 0:
            raise ValueError(f"global sample indices must be non-negative, got {index}")
        gen = _generator(_STREAM_SAMPLE, seed, epoch, index)
        t = float(torch.rand((), generator=gen, dtype=torch.float64))
        uniforms.append(torch.rand(seq_len, generator=gen, dtype=torch.float64))
        if stratify_batch_size:
            step, position = divmod(index, stratify_batch_size)
            offset = float(torch.rand((), generator=_generator(_STREAM_STRATIFY, seed, epoch, step),
                                      dtype=torch.float64))
            t = (offset + position / stratify_batch_size) % 1.0
        if (t_min, t_max) != (0.0, 1.0):
            t = t_min + (t_max - t_min) * t
        t_values.append(t)
    t_B = torch.tensor(t_values, dtype=torch.float64)
    p_mask_B = (1.0 - eps) * t_B + eps
    uniform_BL = torch.stack(uniforms) if uniforms else torch.empty(0, seq_len, dtype=torch.float64)
    return Noise(t_B=t_B.float(), p_mask_B=p_mask_B.float(), uniform_BL=uniform_BL.float())


def cut_length(seq_len: int, *, seed: int, epoch: int, step: int, probability: float) -> int:
    """The variable-length trick: with ``probability`` the step's batch is cut to a length drawn uniformly from
    [1, seq_len]; otherwise ``seq_len``. Pure in (seed, epoch, step), so every rank cuts the same way."""
    if probability <= 0.0:
        return seq_len
    gen = _generator(_STREAM_LENGTH, seed, epoch, step)
    if float(torch.rand((), generator=gen, dtype=torch.float64)) >= probability:
        return seq_len
    return int(torch.randint(1, seq_len + 1, (), generator=gen))
