"""Learning-rate schedules: constant, cosine, and warmup-stable-decay (WSD), all with linear warmup."""

from __future__ import annotations

import math


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, schedule: str,
          min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Warmup rises linearly to ``base_lr`` over ``warmup_steps``. ``cosine`` then falls to ``min_lr_ratio * base_lr``
    at ``total_steps``; ``wsd`` holds ``base_lr`` and decays linearly to the floor over the last
    ``decay_fraction`` of the run; ``constant`` holds.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    floor = base_lr * min_lr_ratio
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + 0.5 * (base_lr - floor) * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, round(total_steps * decay_fraction))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return base_lr
        return base_lr - (base_lr - floor) * min(1.0, (step - decay_start + 1) / decay_steps)
    raise ValueError(f"unknown schedule '{schedule}' (constant, cosine, wsd)")
