"""The masked-diffusion training objective (LLaDA guidelines; reference/lladamoe.md §4).

Pretraining: mask each token of x0 with probability ``p_mask``; loss = sum over masked positions of
``CE / p_mask`` divided by B * L (all positions). SFT: prompt tokens are never masked; per sample the sum over
masked response positions of ``CE / p_mask`` is divided by the response length (EOS padding included), then
averaged over the batch. No timestep is fed to the network. Load-balance and router z-losses are added with
their coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dlmoe.diffusion.noise import Noise, cut_length, draw_noise
from dlmoe.model.balance import load_balance_loss, router_z_loss
from dlmoe.model.moe import RouterStats


def _masked_ce_over_p(logits_BLV: torch.Tensor, x0_BL: torch.Tensor, masked_BL: torch.Tensor,
                      p_mask_B: torch.Tensor) -> torch.Tensor:
    """[B, L] float32 tensor of ``CE / p_mask`` at masked positions and 0 elsewhere (CE on masked rows only)."""
    weighted = torch.zeros(masked_BL.shape, dtype=torch.float32, device=logits_BLV.device)
    rows, cols = masked_BL.nonzero(as_tuple=True)
    ce = F.cross_entropy(logits_BLV[rows, cols].float(), x0_BL[rows, cols], reduction="none")
    return weighted.index_put((rows, cols), ce / p_mask_B[rows].to(ce))


def pretrain_loss(logits_BLV: torch.Tensor, x0_BL: torch.Tensor, masked_BL: torch.Tensor,
                  p_mask_B: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions of CE / p_mask, divided by B * L."""
    batch, seq_len = x0_BL.shape
    return _masked_ce_over_p(logits_BLV, x0_BL, masked_BL, p_mask_B).sum() / (batch * seq_len)


def sft_loss(logits_BLV: torch.Tensor, x0_BL: torch.Tensor, masked_BL: torch.Tensor, p_mask_B: torch.Tensor,
             prompt_len_B: torch.Tensor) -> torch.Tensor:
    """Per sample: sum over masked response positions of CE / p_mask over the response length; batch mean."""
    seq_len = x0_BL.shape[1]
    response_len_B = (seq_len - prompt_len_B.to(torch.float32)).clamp_min(1.0)
    per_sample = _masked_ce_over_p(logits_BLV, x0_BL, masked_BL, p_mask_B).sum(-1)
    return (per_sample / response_len_B.to(per_sample.device)).mean()


def response_mask(prompt_len_B: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, L] True at response positions (at or after the prompt)."""
    positions = torch.arange(seq_len, device=prompt_len_B.device)
    return positions[None, :] >= prompt_len_B[:, None]


@dataclass
class ObjectiveSettings:
    """What the objective needs from the job config (``dlmoe.config.ObjectiveConfig`` supplies it)."""

    mask_token_id: int
    seed: int
    global_batch_size: int
    sft: bool = False
    eps: float = 1e-3
    variable_length_prob: float = 0.01
    stratified_t: bool = False
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    global_balance_counts: bool = True


@dataclass
class ObjectiveOutput:
    """The total loss and its parts (detached parts for logging), the router statistics of the step, and each
    sample's mask ratio ``t_B`` (what the expert-load monitor buckets routing by)."""

    loss: torch.Tensor
    diffusion_loss: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    masked_tokens: int
    seq_len: int
    router_stats: list[RouterStats]
    t_B: torch.Tensor


class MaskedDiffusionObjective:
    """Noise a batch from its global sample indices, run the model, and compute the full training loss."""

    def __init__(self, settings: ObjectiveSettings, group: dist.ProcessGroup | None = None) -> None:
        if settings.global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {settings.global_batch_size}")
        self.settings = settings
        self.group = group

    def noise(self, sample_index_B: torch.Tensor, seq_len: int, epoch: int) -> Noise:
        s = self.settings
        return draw_noise(sample_index_B, seq_len, seed=s.seed, epoch=epoch, eps=s.eps,
                          stratify_batch_size=s.global_batch_size if s.stratified_t else None)

    def step_length(self, sample_index_B: torch.Tensor, seq_len: int, epoch: int) -> int:
        """The (possibly cut) sequence length of the global batch these samples belong to."""
        s = self.settings
        step = int(sample_index_B.reshape(-1)[0]) // s.global_batch_size
        return cut_length(seq_len, seed=s.seed, epoch=epoch, step=step, probability=s.variable_length_prob)

    def __call__(self, model: nn.Module, input_ids_BL: torch.Tensor, sample_index_B: torch.Tensor, epoch: int,
                 prompt_len_B: torch.Tensor | None = None) -> ObjectiveOutput:
        s = self.settings
        if s.sft and prompt_len_B is None:
            raise ValueError("the SFT objective needs prompt_len for every sample")
        full_len = input_ids_BL.shape[1]
        noise = self.noise(sample_index_B, full_len, epoch)
        # SFT keeps whole (prompt, response) pairs: the variable-length cut is a pretraining trick only.
        seq_len = full_len if s.sft else self.step_length(sample_index_B, full_len, epoch)
        x0 = input_ids_BL[:, :seq_len]
        masked = noise.masked(seq_len).to(x0.device)
        if prompt_len_B is not None:
            masked &= response_mask(prompt_len_B.to(x0.device), seq_len)
        x_t = torch.where(masked, torch.full_like(x0, s.mask_token_id), x0)

        out = model(x_t)
        p_mask = noise.p_mask_B.to(x0.device)
        if s.sft:
            assert prompt_len_B is not None
            diffusion = sft_loss(out.logits, x0, masked, p_mask, prompt_len_B.to(x0.device))
        else:
            diffusion = pretrain_loss(out.logits, x0, masked, p_mask)
        zero = diffusion.new_zeros(())
        balance = z_loss = zero
        if out.router_stats and s.aux_loss_coef > 0:
            balance = load_balance_loss(out.router_stats, global_counts=s.global_balance_counts, group=self.group)
        if out.router_stats and s.z_loss_coef > 0:
            z_loss = router_z_loss(out.router_stats)
        loss = diffusion + s.aux_loss_coef * balance + s.z_loss_coef * z_loss
        return ObjectiveOutput(loss=loss, diffusion_loss=diffusion.detach(), balance_loss=balance.detach(),
                               z_loss=z_loss.detach(), masked_tokens=int(masked.sum()), seq_len=seq_len,
                               router_stats=out.router_stats, t_B=noise.t_B)
