"""Generation from a masked-diffusion model (reference/lladamoe.md §5).

The answer starts as ``gen_length`` mask tokens after the prompt and is decoded block by block, left to right
(semi-autoregressive). Each iteration is one forward pass over the whole sequence; every still-masked position of
the current block gets a candidate ``x0 = argmax(logits + temperature · Gumbel noise)`` (noise in float64) and a
confidence, the softmax probability of that candidate. Then either

- **low-confidence remasking** (LLaDA): commit the ``n`` most confident positions, ``n`` following a linear schedule
  over the block's ``steps / num_blocks`` iterations (equal counts, the remainder spread over the first steps); or
- **confidence-threshold parallel decoding** (Fast-dLLM): commit every position whose confidence exceeds
  ``threshold``, and at least the most confident one, until the block is complete.

A model trained with block diffusion (LLaDA 2.0; blocks.py) decodes with ``block_causal``: the prompt is block 0
and answer block k is block k + 1, and a position attends only its own block and those before it — exactly what
its training showed the noised block (clean prefix blocks and itself), so no still-masked later block is seen.

Prompts of different lengths share a batch left-padded with an attention mask: RoPE attention scores depend on
relative positions only, so a padded prompt decodes exactly as it would alone. The mask token is never a valid
answer; EOS can be suppressed, and by default a sample whose answer holds an EOS stops after its block (the rest
is filled with EOS and, once every sample has stopped, no further forward pass runs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dlmoe.diffusion.blocks import block_causal_pattern
from dlmoe.errors import GenerationError


@dataclass
class GenerationSettings:
    """How to decode: lengths, schedule and sampling (defaults: LLaDA's one token per forward pass)."""

    gen_length: int = 64
    block_length: int = 32
    steps: int = 64
    threshold: float | None = None
    temperature: float = 0.0
    stop_at_eos: bool = True
    suppress_eos: bool = False
    seed: int = 0
    block_causal: bool = False  # attend only the own block and earlier ones (a block-diffusion model)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    def validate(self, prompt_lengths: Sequence[int], max_positions: int) -> None:
        """Raise ``GenerationError`` naming the setting, or the prompt, that cannot work."""
        self.check()
        if not prompt_lengths:
            raise GenerationError("no prompts given")
        longest = max(prompt_lengths)
        if longest + self.gen_length > max_positions:
            raise GenerationError(f"prompt of {longest} tokens + gen_length {self.gen_length} exceeds the model's "
                                  f"context of {max_positions} positions (max_position_embeddings)")

    def check(self) -> None:
        """Raise ``GenerationError`` naming the setting that cannot work whatever the model and prompts (the
        command line checks this before it loads a model)."""
        if self.gen_length <= 0:
            raise GenerationError(f"gen_length must be positive, got {self.gen_length}")
        if self.block_length <= 0 or self.gen_length % self.block_length:
            raise GenerationError(f"gen_length {self.gen_length} is not divisible by block_length "
                                  f"{self.block_length}")
        if self.threshold is None:
            if self.steps <= 0 or self.steps % self.num_blocks:
                raise GenerationError(f"steps {self.steps} is not a positive multiple of the number of blocks "
                                      f"{self.num_blocks} (gen_length / block_length)")
            if self.steps // self.num_blocks > self.block_length:
                raise GenerationError(f"steps per block {self.steps // self.num_blocks} exceeds block_length "
                                      f"{self.block_length}: some steps would commit nothing")
        elif not 0.0 < self.threshold <= 1.0:
            raise GenerationError(f"threshold must lie in (0, 1], got {self.threshold}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise GenerationError(f"temperature must be a finite number >= 0, got {self.temperature}")


@dataclass
class GenerationResult:
    """Per-sample answers (cut before the first EOS when stopping at EOS) and what decoding cost."""

    answers: list[list[int]]
    sequences: torch.Tensor
    prompt_width: int
    forward_passes: int
    seconds: float

    @property
    def generated_tokens(self) -> int:
        return sum(len(a) for a in self.answers)


def _schedule(masked: int, steps: int) -> list[int]:
    """LLaDA's linear schedule: ``masked`` commits spread evenly over ``steps``, remainder to the first steps."""
    base, extra = divmod(masked, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


@torch.no_grad()
def generate(model: nn.Module, prompts: Sequence[Sequence[int]], settings: GenerationSettings, *, mask_id: int,
             eos_id: int, pad_id: int, on_forward: Callable[[int], None] | None = None) -> GenerationResult:
    """Decode an answer for every prompt (token ids). ``model(ids, attention_mask)`` must return ``.logits``.

    ``on_forward`` is called after every forward pass with the count so far (for progress bars).
    """
    config = getattr(model, "config", None)
    max_positions = int(getattr(config, "max_position_embeddings", 1 << 30))
    vocab = int(getattr(config, "vocab_size", 1 << 62))
    lengths = [len(p) for p in prompts]
    settings.validate(lengths, max_positions)
    for i, prompt in enumerate(prompts):
        if any(not 0 <= t < vocab for t in prompt):
            raise GenerationError(f"prompt {i} holds token ids outside the vocabulary [0, {vocab})")
        if mask_id in prompt:
            raise GenerationError(f"prompt {i} holds the mask token id {mask_id}; prompts must be fully known")

    device = next(model.parameters()).device
    batch, width = len(prompts), max(lengths)
    total = width + settings.gen_length
    x = torch.full((batch, total), mask_id, dtype=torch.long, device=device)
    keep = torch.ones((batch, total), dtype=torch.long, device=device)
    for b, prompt in enumerate(prompts):
        start = width - len(prompt)
        x[b, :start] = pad_id
        keep[b, :start] = 0
        x[b, start:width] = torch.tensor(list(prompt), dtype=torch.long, device=device)
    attention_mask = keep if bool((keep == 0).any()) else None
    pattern = None
    if settings.block_causal:
        block_L = torch.zeros(total, dtype=torch.long, device=device)
        block_L[width:] = 1 + torch.arange(settings.gen_length, device=device) // settings.block_length
        # Padding folds into the pattern; every position also sees itself, so no row of it is empty.
        pattern = (block_causal_pattern(block_L) & keep.bool()[:, None, None, :]
                   | torch.eye(total, dtype=torch.bool, device=device))

    def forward(ids: torch.Tensor) -> torch.Tensor:
        out = model(ids, attention_mask) if pattern is None else model(ids, attention_pattern=pattern)
        logits: torch.Tensor = out.logits
        return logits
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    forward_passes = 0
    started = time.perf_counter()

    for block in range(settings.num_blocks):
        lo = width + block * settings.block_length
        hi = lo + settings.block_length
        if settings.threshold is None:
            steps = settings.steps // settings.num_blocks
            masked_count = (x[:, lo:hi] == mask_id).sum(-1).tolist()
            plan = [_schedule(n, steps) for n in masked_count]
        step = 0
        while bool((x[:, lo:hi] == mask_id).any()):
            logits = forward(x)[:, lo:hi].to(torch.float64)
            forward_passes += 1
            logits[..., mask_id] = -math.inf
            if settings.suppress_eos:
                logits[..., eos_id] = -math.inf
            scores = logits
            if settings.temperature > 0:
                uniform = torch.rand(logits.shape, generator=generator, device=device, dtype=torch.float64)
                gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float64).tiny)))
                scores = logits + settings.temperature * gumbel
            candidate = scores.argmax(-1)
            confidence = torch.softmax(logits, -1).gather(-1, candidate[..., None]).squeeze(-1)
            masked = x[:, lo:hi] == mask_id
            confidence = torch.where(masked, confidence, -math.inf)
            commit = torch.zeros_like(masked)
            for b in range(batch):
                if not bool(masked[b].any()):
                    continue
                if settings.threshold is None:
                    count = plan[b][step] if step < len(plan[b]) else int(masked[b].sum())
                else:
                    count = max(1, int((confidence[b] > settings.threshold).sum()))
                commit[b, confidence[b].topk(count).indices] = True
            x[:, lo:hi] = torch.where(commit, candidate, x[:, lo:hi])
            step += 1
            if on_forward is not None:
                on_forward(forward_passes)
        if settings.stop_at_eos:
            finished = (x[:, width:hi] == eos_id).any(-1) & ~done
            x[finished, hi:] = eos_id
            done |= finished
            if bool(done.all()):
                break

    answers = []
    for b in range(batch):
        answer = x[b, width:].tolist()
        if settings.stop_at_eos and eos_id in answer:
            answer = answer[:answer.index(eos_id)]
        answers.append(answer)
    return GenerationResult(answers=answers, sequences=x, prompt_width=width, forward_passes=forward_passes,
                            seconds=time.perf_counter() - started)
