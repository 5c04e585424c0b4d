"""The masked-diffusion training objective (LLaDA guidelines; reference/lladamoe.md §4).

Pretraining: mask each token of x0 with probability ``p_mask``; loss = sum over masked positions of
``CE / p_mask`` divided by B * L (all positions). SFT: prompt tokens are never masked; per sample the sum over
masked response positions of ``CE / p_mask`` is divided by the response length (EOS padding included), then
averaged over the batch. No timestep is fed to the network. Load-balance and router z-losses are added with
their coefficients.

The LLaDA 2.0 recipes (arXiv 2512.15745; blocks.py) are options, all off by default: ``document_attention`` keeps
the documents of a packed row apart; ``block_size`` > 0 trains block diffusion — the model sees ``[x_t ‖ x0]`` and
the loss is taken on the noised half's logits. Its loss is the paper's block-diffusion ELBO, the sum over all blocks
and positions of the masked tokens' ``CE / p_mask`` (α'_t / (1 - α_t) = 1 / t for the linear schedule), normalised
exactly as above (by B · L, or per response length for SFT): every position belongs to exactly one block, so it is
the same per-token estimate, only conditioned on clean prefix blocks. ``t_min``/``t_max`` restrict the noise level.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dlmoe.diffusion.blocks import block_diffusion_pattern, document_pattern, document_positions
from dlmoe.diffusion.noise import Noise, cut_length, draw_noise
from dlmoe.model.balance import load_balance_loss, router_z_loss
from dlmoe.model.moe import RouterStats
from dlmoe.model.transformer import ModelOutput


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
    t_min: float = 0.0
    t_max: float = 1.0
    document_attention: bool = False
    block_size: int = 0  # 0: full-sequence diffusion


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
        # The block size of the current step: the block schedule changes it between steps.
        self.block_size = settings.block_size
        self._warned_no_documents = False

    def noise(self, sample_index_B: torch.Tensor, seq_len: int, epoch: int) -> Noise:
        s = self.settings
        return draw_noise(sample_index_B, seq_len, seed=s.seed, epoch=epoch, eps=s.eps,
                          stratify_batch_size=s.global_batch_size if s.stratified_t else None,
                          t_range=(s.t_min, s.t_max))

    def forward_model(self, model: nn.Module, x_t: torch.Tensor, x0: torch.Tensor,
                      doc_ids_BL: torch.Tensor | None) -> ModelOutput:
        """The model's logits [B, L, V] for ``x_t`` under the objective's attention (whole rows by default)."""
        if self.settings.document_attention and doc_ids_BL is None and not self._warned_no_documents:
            warnings.warn("objective.document_attention is set but the data records no document boundaries (a "
                          "dataset of format version 1): attending whole rows", stacklevel=3)
            self._warned_no_documents = True
        docs = doc_ids_BL if self.settings.document_attention else None
        seq_len = x_t.shape[1]
        block = self.block_size if 0 < self.block_size < seq_len else 0  # one block is plain masked diffusion
        if docs is None and not block:
            out: ModelOutput = model(x_t)
            return out
        pattern = positions = None
        if docs is not None:
            pattern, positions = document_pattern(docs), document_positions(docs)
        if not block:
            out = model(x_t, attention_pattern=pattern, position_ids=positions)
            return out
        both = block_diffusion_pattern(seq_len, block, x_t.device)
        if docs is not None and positions is not None:
            both = both & document_pattern(torch.cat([docs, docs], dim=1))
            positions = torch.cat([positions, positions], dim=1)
        else:
            positions = torch.arange(seq_len, device=x_t.device).repeat(2)[None]
        out = model(torch.cat([x_t, x0], dim=1), attention_pattern=both, position_ids=positions)
        return ModelOutput(logits=out.logits[:, :seq_len], router_stats=out.router_stats)

    def step_length(self, sample_index_B: torch.Tensor, seq_len: int, epoch: int) -> int:
        """The (possibly cut) sequence length of the global batch these samples belong to."""
        s = self.settings
        step = int(sample_index_B.reshape(-1)[0]) // s.global_batch_size
        return cut_length(seq_len, seed=s.seed, epoch=epoch, step=step, probability=s.variable_length_prob)

    def __call__(self, model: nn.Module, input_ids_BL: torch.Tensor, sample_index_B: torch.Tensor, epoch: int,
                 prompt_len_B: torch.Tensor | None = None, doc_ids_BL: torch.Tensor | None = None) -> ObjectiveOutput:
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

        docs = None if doc_ids_BL is None else doc_ids_BL[:, :seq_len].to(x0.device)
        out = self.forward_model(model, x_t, x0, docs)
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
