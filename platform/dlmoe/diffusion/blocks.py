"""Attention patterns of the LLaDA 2.0 recipes (arXiv 2512.15745) and the block-size schedule.

**Document-level attention.** A packed row holds several documents; with their ``doc_ids`` [B, L] (0, 0, 1, 1, 1, …)
a query attends only keys of its own document, and each document's RoPE positions restart at 0, so a document in
a packed row is computed as it would be alone.

**Block diffusion** (BD3-LM, as LLaDA 2.0 trains it). The row is cut into blocks of ``block_size`` positions
(block k = positions [k·b, (k+1)·b); the last one may be shorter). The model sees the noised row x_t and the clean
row x0 side by side, ``[x_t ‖ x0]`` of length 2L, both halves at positions 0..L-1, under the paper's three-part
mask: a noised block attends itself (block-diagonal, M_BD) and the clean blocks before it (offset block-causal,
M_OBC); a clean block attends the clean blocks up to and including itself (block-causal, M_BC); nothing attends a
noised block from outside it. So the prediction of block k sees x0 of blocks < k and x_t of block k only — the
semi-autoregressive factorisation the sampler decodes with (``block_causal_pattern``).

**Block-level WSD schedule.** Warm-up: the block size grows by doubling from ``start_block_size`` towards the
sequence length, in equal shares of the warm-up steps; stable: full-sequence diffusion (plain masked diffusion,
block size = L, reported as 0); decay: the block size halves from L down to ``final_block_size`` in equal shares of
the decay steps. A pure function of the step, like the learning rate, so a resumed run continues it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def document_pattern(doc_ids_BL: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] True where query and key lie in the same document."""
    return (doc_ids_BL[:, :, None] == doc_ids_BL[:, None, :])[:, None]


def document_positions(doc_ids_BL: torch.Tensor) -> torch.Tensor:
    """[B, L] RoPE positions restarting at 0 at every document start (``doc_ids`` non-decreasing along a row)."""
    batch, seq_len = doc_ids_BL.shape
    index = torch.arange(seq_len, device=doc_ids_BL.device).expand(batch, seq_len)
    starts = torch.zeros_like(doc_ids_BL, dtype=torch.bool)
    starts[:, 1:] = doc_ids_BL[:, 1:] != doc_ids_BL[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def block_diffusion_pattern(seq_len: int, block_size: int, device: torch.device | str | None = None
                            ) -> torch.Tensor:
    """[1, 1, 2L, 2L] mask over ``[x_t ‖ x0]``: M_BD and M_OBC for the noised half, M_BC for the clean half."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    block = torch.arange(seq_len, device=device) // block_size
    q, k = block[:, None], block[None, :]
    noised_to_noised = q == k  # M_BD
    noised_to_clean = k < q  # M_OBC
    clean_to_clean = k <= q  # M_BC
    clean_to_noised = torch.zeros_like(noised_to_noised)
    top = torch.cat([noised_to_noised, noised_to_clean], dim=1)
    bottom = torch.cat([clean_to_noised, clean_to_clean], dim=1)
    return torch.cat([top, bottom], dim=0)[None, None]


def block_causal_pattern(block_ids_L: torch.Tensor) -> torch.Tensor:
    """[1, 1, L, L] True where the key's block is at or before the query's (blocks numbered left to right): what a
    block-diffusion model sees while its current block is decoded after a clean prefix."""
    return (block_ids_L[None, :] <= block_ids_L[:, None])[None, None]


@dataclass(frozen=True)
class BlockSchedule:
    """The block-level WSD schedule (module docstring); step counts in optimizer steps."""

    total_steps: int
    warmup_steps: int
    decay_steps: int
    start_block_size: int = 1
    final_block_size: int = 32

    def block_size_at(self, step: int, seq_len: int) -> int:
        """Block size for optimizer step ``step`` (0-based) at sequence length ``seq_len``; 0: full sequence."""
        if step < self.warmup_steps:
            sizes = _doublings(self.start_block_size, seq_len)
            return sizes[step * len(sizes) // self.warmup_steps] if sizes else 0
        decay_start = self.total_steps - self.decay_steps
        if step >= decay_start:
            sizes = _doublings(self.final_block_size, seq_len)[::-1]
            return sizes[min(len(sizes) - 1, (step - decay_start) * len(sizes) // self.decay_steps)] if sizes else 0
        return 0


def _doublings(start: int, seq_len: int) -> list[int]:
    """``start``, 2·start, 4·start, … below ``seq_len``."""
    sizes = []
    size = start
    while size < seq_len:
        sizes.append(size)
        size *= 2
    return sizes
