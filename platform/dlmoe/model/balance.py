"""Load-balancing losses, aux-loss-free bias balancing, and expert-load statistics.

Scaling convention (reference/lladamoe.md §4): the Switch-style loss is ``E * sum_e f_e * P_e`` with ``f_e`` the
fraction of routed token *slots* sent to expert e (the f_e sum to 1) and ``P_e`` the mean router probability of
e. It equals 1 at perfect balance (the DeepSpeed / Megablocks / OLMo-core form), so the reference coefficient
0.01 keeps its meaning. (The HF/Mixtral form counts f_e per token, sums to k and equals k at balance: the same
loss times k.) Both losses are averaged over the MoE layers, so the coefficient does not scale with depth.

With ``global_counts`` the f_e come from the token counts of the whole global batch: pass the counts summed over
micro-batches, and with a process group they are all-reduced across ranks (a no-op on one process). f_e carries
no gradient either way; the gradient flows through the local P_e.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dlmoe.model.moe import Router, RouterStats


def _global_counts(counts_LE: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    counts = counts_LE.detach().to(torch.float32).clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, group=group)
    return counts


def load_balance_loss(stats: Sequence[RouterStats], *, global_counts: bool = False,
                      counts_LE: torch.Tensor | None = None,
                      group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Switch-style load-balance loss averaged over layers (1.0 at perfect balance).

    ``counts_LE`` overrides the per-layer token counts (e.g. summed over the micro-batches of a step); with
    ``global_counts`` they are all-reduced over ``group``.
    """
    if not stats:
        raise ValueError("load_balance_loss needs the router statistics of at least one MoE layer")
    counts = counts_LE if counts_LE is not None else torch.stack([s.tokens_per_expert_E for s in stats])
    if global_counts:
        counts = _global_counts(counts, group)
    counts = counts.to(torch.float32)
    f_LE = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    num_experts = f_LE.shape[-1]
    # A micro-batch of padding only has no router scores: its layers contribute P = 0, not NaN.
    per_layer = [num_experts * (f_LE[i] * s.scores_TE.sum(0) / max(1, s.scores_TE.shape[0])).sum()
                 for i, s in enumerate(stats)]
    return torch.stack(per_layer).mean()


def router_z_loss(stats: Sequence[RouterStats]) -> torch.Tensor:
    """``mean(logsumexp(logits)^2)`` over tokens, averaged over layers (ST-MoE router z-loss)."""
    if not stats:
        raise ValueError("router_z_loss needs the router statistics of at least one MoE layer")
    return torch.stack([torch.logsumexp(s.logits_TE, dim=-1).square().sum() / max(1, s.logits_TE.shape[0])
                        for s in stats]).mean()


@dataclass
class ExpertLoad:
    """Per-layer expert-load summary; every field is a [layers] tensor except ``share_LE`` and ``dead_LE``
    [layers, experts]."""

    share_LE: torch.Tensor
    max_over_mean: torch.Tensor
    coefficient_of_variation: torch.Tensor
    normalized_entropy: torch.Tensor
    dead_LE: torch.Tensor

    @property
    def dead_experts(self) -> torch.Tensor:
        """The number of dead experts per layer."""
        return self.dead_LE.sum(-1)

    def as_metrics(self, prefix: str = "moe") -> dict[str, float]:
        """Flat scalar metrics per layer, and one over the layers, for trackers: the worst layer's max/mean (what
        flags imbalance everywhere: the dashboard, /metrics, the operator's BALANCE column; one starved layer is the
        one to look at, and a mean over layers hides it), the mean of the others."""
        metrics: dict[str, float] = {}
        for name in ("max_over_mean", "coefficient_of_variation", "normalized_entropy", "dead_experts"):
            values: torch.Tensor = getattr(self, name)
            for layer, value in enumerate(values.tolist()):
                metrics[f"{prefix}/layer{layer}/{name}"] = float(value)
            over_layers = values.float().max() if name == "max_over_mean" else values.float().mean()
            metrics[f"{prefix}/{name}"] = float(over_layers)
        return metrics


def expert_load(counts_LE: torch.Tensor, dead_fraction: float = 0.0) -> ExpertLoad:
    """Summarise routed-slot counts [layers, experts]: share per expert, max/mean imbalance, coefficient of
    variation, entropy normalised to 1 at perfect balance, and the dead experts — those whose share is at most
    ``dead_fraction`` of the fair share 1/E (with 0, those that got no token)."""
    counts = counts_LE.detach().to(torch.float64)
    num_experts = counts.shape[-1]
    total = counts.sum(-1, keepdim=True)
    share = counts / total.clamp_min(1.0)
    mean = total.squeeze(-1) / num_experts
    safe_mean = mean.clamp_min(1e-12)
    entropy = -(share * torch.log(share.clamp_min(1e-30))).sum(-1)
    return ExpertLoad(
        share_LE=share.float(),
        max_over_mean=(counts.max(-1).values / safe_mean).float(),
        coefficient_of_variation=(counts.std(-1, unbiased=False) / safe_mean).float(),
        normalized_entropy=(entropy / math.log(num_experts) if num_experts > 1 else torch.ones_like(entropy)).float(),
        dead_LE=share <= dead_fraction / num_experts,
    )


class AuxFreeBalancer:
    """Aux-loss-free balancing (DeepSeek-V3): after each optimizer step,
    ``bias_e += rate * sign(mean_load - load_e)`` on every router's selection bias.

    The bias changes which experts are selected, never the combine weights (see ``Router``). Call ``update``
    with the step's counts (summed over micro-batches and, with a group, all-reduced across ranks).
    """

    def __init__(self, model: nn.Module, rate: float, group: dist.ProcessGroup | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"aux-free balancing rate must be positive, got {rate}")
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        if not self.routers:
            raise ValueError("aux-free balancing needs a model with MoE layers")
        self.rate = rate
        self.group = group

    @torch.no_grad()
    def update(self, counts_LE: torch.Tensor) -> None:
        counts = _global_counts(counts_LE, self.group)
        if counts.shape[0] != len(self.routers):
            raise ValueError(f"got counts for {counts.shape[0]} layers, the model has {len(self.routers)} routers")
        for router, load_E in zip(self.routers, counts, strict=True):
            step = self.rate * torch.sign(load_E.mean() - load_E)
            router.selection_bias_E.add_(step.to(router.selection_bias_E))
