"""The dropless Mixture-of-Experts block: router, grouped experts, and the statistics the losses need.

Shape-suffix legend (torchtitan style): a name ends with the letters of its dimensions.
    T  tokens in the (flattened) micro-batch          D  hidden size
    E  number of experts                              K  experts per token (top-k)
    N  routed token slots, N = T * K                  I  expert intermediate size
So ``x_TD`` is the input, ``scores_TE`` the router probabilities, ``tokens_per_expert_E`` the per-expert counts.

Module names and attributes follow the release (``mlp.gate``, ``mlp.experts``, ``num_experts``,
``num_experts_per_tok``) so that DeepSpeed AutoEP recognises the block. The experts are stored fused as 3-D
tensors, ``experts.gate_up_proj`` [E, 2I, D] (gate rows first, then up rows) and ``experts.down_proj`` [E, D, I]:
the layout AutoEP calls ``fused_3d``/"gate_up_first" (``expert_w1=gate_up_proj, expert_w2=down_proj,
expert_w3=null``). Fused storage is what lets the experts run as two grouped matrix products without stacking
64 weight matrices on every step (see BENCHMARKS.md); the exporter splits them into the release's per-expert keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dlmoe.model.config import ModelConfig


@dataclass
class RouterStats:
    """What one MoE layer reports for the load-balance losses and the expert-load metrics.

    ``logits_TE`` and ``scores_TE`` (float32, differentiable) cover the valid (non-padding) tokens only;
    ``tokens_per_expert_E`` counts the routed slots of those tokens and ``experts_TK`` names the experts each of
    them was sent to (both without gradient; the expert-load monitor splits the counts by mask ratio with it).
    """

    logits_TE: torch.Tensor
    scores_TE: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    experts_TK: torch.Tensor


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm`` where its 16-byte stride rule holds, else a per-group loop with the same result.

    Two forms are used: ``a`` [N, k] × ``b`` [G, k, n] → [N, n] (rows of ``a`` grouped by ``offs``), and
    ``a`` [k, N] × ``b`` [N, n] → [G, k, n] (the reduction dimension grouped, for weight gradients).
    """
    aligned = all(s * a.element_size() % 16 == 0 for s in (a.shape[-1], b.shape[-1], a.shape[0], b.shape[-2]))
    if aligned and hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(a, b, offs=offs)
    bounds = [0, *offs.tolist()]
    if b.dim() == 3:
        out = a.new_empty(a.shape[0], b.shape[-1])
        for g in range(b.shape[0]):
            lo, hi = bounds[g], bounds[g + 1]
            out[lo:hi] = a[lo:hi] @ b[g]
        return out
    return torch.stack([a[:, bounds[g]:bounds[g + 1]] @ b[bounds[g]:bounds[g + 1]] for g in range(len(offs))])


class _GroupedSwiGLU(torch.autograd.Function):
    """Weighted SwiGLU experts over expert-sorted rows: ``weight * down(silu(gate(x)) * up(x))`` per row, as two
    grouped GEMMs forward and four backward.

    The routing weight scales the activation (width I) rather than the output (width D): the same product,
    on the narrower tensor. Only the input rows, the gate/up pre-activations and the weights are saved; the
    activation is recomputed in backward.
    """

    @staticmethod
    def forward(ctx: Any, x_ND: torch.Tensor, weight_N: torch.Tensor, gate_up_EHD: torch.Tensor,
                down_EDI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        inter = down_EDI.shape[-1]
        h_NH = _grouped_mm(x_ND, gate_up_EHD.transpose(-2, -1), offs_E)
        gate, up = h_NH[:, :inter], h_NH[:, inter:]
        act_NI = F.silu(gate) * up
        act_NI *= weight_N[:, None]
        ctx.save_for_backward(x_ND, weight_N, h_NH, gate_up_EHD, down_EDI, offs_E)
        return _grouped_mm(act_NI, down_EDI.transpose(-2, -1), offs_E)

    @staticmethod
    def backward(ctx: Any, grad_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                           torch.Tensor, None]:
        x_ND, weight_N, h_NH, gate_up_EHD, down_EDI, offs_E = ctx.saved_tensors
        inter = down_EDI.shape[-1]
        grad_ND = grad_ND.contiguous()
        gate, up = h_NH[:, :inter], h_NH[:, inter:]
        sig = torch.sigmoid(gate)
        silu = gate * sig
        act_NI = silu * up
        grad_weighted_NI = _grouped_mm(grad_ND, down_EDI, offs_E)
        grad_weight_N = (grad_weighted_NI * act_NI).sum(-1)
        act_NI *= weight_N[:, None]
        grad_down = _grouped_mm(grad_ND.t(), act_NI, offs_E)
        grad_act_NI = grad_weighted_NI.mul_(weight_N[:, None])
        # d silu(g)/dg = sig + silu * (1 - sig); both halves are written in place to skip a concatenation.
        grad_h_NH = torch.empty_like(h_NH)
        torch.mul(grad_act_NI, silu, out=grad_h_NH[:, inter:])
        torch.mul(grad_act_NI * up, torch.addcmul(sig, silu, 1 - sig), out=grad_h_NH[:, :inter])
        grad_gate_up = _grouped_mm(grad_h_NH.t(), x_ND, offs_E)
        grad_x = _grouped_mm(grad_h_NH, gate_up_EHD, offs_E)
        return grad_x, grad_weight_N, grad_gate_up, grad_down, None


class GroupedExperts(nn.Module):
    """All experts of a layer as fused 3-D weights, run as grouped GEMMs over expert-sorted tokens."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x_ND: torch.Tensor, weight_N: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Rows of ``x_ND`` sorted by expert (``tokens_per_expert_E`` rows each), scaled by ``weight_N``."""
        offs_E = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
        out: torch.Tensor = _GroupedSwiGLU.apply(  # type: ignore[no-untyped-call]
            x_ND, weight_N, self.gate_up_proj, self.down_proj, offs_E)
        return out


def select_experts(logits_TE: torch.Tensor, top_k: int, bias_E: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA-MoE's routing (reference §2): float32 softmax over all experts, then the top-k of the probabilities
    (shifted by ``bias_E`` for the choice only). Returns (scores_TE, experts_TK)."""
    scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    # Select with the bias, weigh without it (a zero bias selects exactly the unbiased top-k).
    chosen_from = scores_TE.detach() if bias_E is None else scores_TE + bias_E
    return scores_TE, torch.topk(chosen_from, top_k, dim=-1).indices


def router_stats(logits_TE: torch.Tensor, scores_TE: torch.Tensor, experts_TK: torch.Tensor, num_experts: int,
                 tokens_per_expert_E: torch.Tensor | None = None) -> RouterStats:
    """The ``RouterStats`` of the routed tokens given (counted here unless ``tokens_per_expert_E`` is)."""
    if tokens_per_expert_E is None:
        tokens_per_expert_E = torch.bincount(experts_TK.reshape(-1), minlength=num_experts)
    return RouterStats(logits_TE=logits_TE.float(), scores_TE=scores_TE,
                       tokens_per_expert_E=tokens_per_expert_E.detach(), experts_TK=experts_TK.detach())


class Router(nn.Module):
    """Softmax-then-top-k router (reference §2): float32 softmax over all experts, top-k of the probabilities,
    no renormalisation unless ``norm_topk_prob``.

    ``selection_bias_E`` is the aux-loss-free balancing bias (DeepSeek-V3 style): it shifts which experts are
    chosen but never the weights. It stays zero — and routing is then exactly the release's — unless a balancer
    outside the model updates it.
    """

    selection_bias_E: torch.Tensor

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.register_buffer("selection_bias_E", torch.zeros(num_experts), persistent=True)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (logits_TE, scores_TE, weights_TK in the input dtype, experts_TK)."""
        logits_TE = F.linear(x_TD, self.weight)
        scores_TE, experts_TK = select_experts(logits_TE, self.top_k, self.selection_bias_E)
        weights_TK = scores_TE.gather(-1, experts_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return logits_TE, scores_TE, weights_TK.to(x_TD.dtype), experts_TK


class MoEBlock(nn.Module):
    """Dropless top-k MoE: every token reaches its k experts; tokens are sorted by expert and the experts run
    as grouped GEMMs; outputs are weighted by the (unrenormalised) router probabilities and summed per token."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.gate = Router(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                           config.norm_topk_prob)
        self.experts = GroupedExperts(config.num_experts, config.hidden_size, config.expert_intermediate_size)

    def forward(self, x: torch.Tensor, valid_T: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterStats]:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        logits_TE, scores_TE, weights_TK, experts_TK = self.gate(x_TD)
        top_k = self.num_experts_per_tok

        slot_experts_N = experts_TK.reshape(-1)
        order_N = torch.argsort(slot_experts_N, stable=True)
        token_N = order_N // top_k
        tokens_per_expert_E = torch.bincount(slot_experts_N, minlength=self.num_experts)
        y_ND = self.experts(torch.index_select(x_TD, 0, token_N), weights_TK.reshape(-1)[order_N],
                            tokens_per_expert_E)
        out_TD = torch.zeros_like(x_TD).index_add_(0, token_N, y_ND)

        if valid_T is not None:
            return out_TD.view(shape), router_stats(logits_TE[valid_T], scores_TE[valid_T], experts_TK[valid_T],
                                                    self.num_experts)
        return out_TD.view(shape), router_stats(logits_TE, scores_TE, experts_TK, self.num_experts,
                                                tokens_per_expert_E)
