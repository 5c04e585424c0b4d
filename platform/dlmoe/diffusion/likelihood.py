"""The likelihood of a continuation under a masked-diffusion model, by Monte Carlo (LLaDA's evaluation procedure).

A masked-diffusion LM gives no exact ``log p(answer | prompt)``; it bounds it from below by the ELBO

    log p(a | p) ≥ E_l E_{M, |M| = l} [ (L / l) · Σ_{i ∈ M} log p_θ(a_i | p, a with the positions M masked) ],

with L the answer's length, the number of masked tokens l uniform on {1, …, L}, and M a uniformly random set of l
answer positions; the prompt is never masked. The estimate averages ``samples`` draws in which l is stratified —
l_j = 1 + ⌊((u + j / N) mod 1) · L⌋ for one uniform u — so the N draws cover 1 … L evenly, with less variance than
independent draws. The draws come from a generator seeded by ``seed``: the same inputs give the same estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dlmoe.errors import ModelInputError


@dataclass(frozen=True)
class LikelihoodSettings:
    samples: int = 64      # Monte-Carlo draws per continuation
    batch_size: int = 32   # draws per forward pass
    seed: int = 0

    def validate(self) -> None:
        for name in ("samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ModelInputError(f"{name} must be at least 1, got {getattr(self, name)}")


def masked_counts(samples: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """The stratified numbers of masked tokens l_j ∈ {1, …, length} of ``samples`` draws."""
    u = torch.rand((), generator=generator, dtype=torch.float64)
    fractions = (u + torch.arange(samples, dtype=torch.float64) / samples) % 1.0
    return 1 + torch.floor(fractions * length).long().clamp(max=length - 1)


@torch.no_grad()
def continuation_log_likelihood(model: nn.Module, prompt: Sequence[int], answer: Sequence[int], *, mask_id: int,
                                settings: LikelihoodSettings | None = None) -> float:
    """The Monte-Carlo ELBO estimate of ``log p(answer | prompt)`` (natural log, summed over the answer)."""
    settings = settings or LikelihoodSettings()
    settings.validate()
    if not answer:
        raise ModelInputError("the answer is empty: there is no continuation to score")
    if mask_id in prompt or mask_id in answer:
        raise ModelInputError(f"the prompt or answer holds the mask id {mask_id}; score unmasked text only")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)
    length, start = len(answer), len(prompt)
    sequence = torch.tensor([*prompt, *answer], dtype=torch.long)
    targets = sequence[start:].to(device)
    counts = masked_counts(settings.samples, length, generator)
    total = torch.zeros((), dtype=torch.float64)
    for lo in range(0, settings.samples, settings.batch_size):
        count = counts[lo:lo + settings.batch_size]
        # A uniformly random set of l positions: the l lowest of independent uniform scores.
        ranks = torch.rand((len(count), length), generator=generator).argsort(dim=1).argsort(dim=1)
        masked = ranks < count[:, None]
        rows = sequence.repeat(len(count), 1)
        rows[:, start:][masked] = mask_id
        logits = model(rows.to(device)).logits[:, start:].float()
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets.expand(len(count), -1)[..., None])[..., 0]
        per_draw = (log_probs * masked.to(device)).sum(dim=1).double().cpu() * (length / count.double())
        total += per_draw.sum()
    return float(total / settings.samples)
