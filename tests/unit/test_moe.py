"""The dropless grouped MoE equals a naive per-expert loop in forward and gradients (fp32 against the loop in
float64, to 2e-6 of each tensor's scale)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dlmoe.model import MoEBlock, get_flavor
from dlmoe.model.moe import _grouped_mm

from .naive_reference import naive_moe, split_experts


def make_block(num_experts: int, top_k: int, hidden: int, inter: int, norm_topk: bool = False,
               seed: int = 0) -> MoEBlock:
    cfg = dataclasses.replace(get_flavor("debug"), hidden_size=hidden, num_attention_heads=1, num_key_value_heads=1,
                              num_experts=num_experts, num_experts_per_tok=top_k, expert_intermediate_size=inter,
                              norm_topk_prob=norm_topk)
    block = MoEBlock(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.3, generator=gen)
    return block


CASES = [
    (8, 2, 64, 32, False),
    (16, 4, 32, 24, True),
    (64, 8, 48, 16, False),
    (5, 5, 12, 6, False),  # unaligned sizes: the per-group fallback; top-k = all experts
    (4, 1, 16, 8, False),
]


@pytest.mark.parametrize(("num_experts", "top_k", "hidden", "inter", "norm_topk"), CASES)
def test_forward_and_gradients_match_naive_loop(num_experts: int, top_k: int, hidden: int, inter: int,
                                               norm_topk: bool) -> None:
    block = make_block(num_experts, top_k, hidden, inter, norm_topk)
    x = torch.randn(37, hidden, generator=torch.Generator().manual_seed(1), requires_grad=True)
    upstream = torch.randn(37, hidden, generator=torch.Generator().manual_seed(2))

    out, stats = block(x)
    out.backward(upstream)
    fast_grads = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]

    # The per-expert loop in float64 is the truth. Both fp32 paths round differently (summation order, FMA: it
    # differs between CPUs), so each is held to it within 2e-6 of the tensor's scale (~16 float32 ulps).
    x_ref = x.detach().double().requires_grad_(True)
    params = [p.detach().double().requires_grad_(True) for p in block.parameters()]
    gate_w, gate_up, down = params
    ref = naive_moe(x_ref, gate_w, split_experts(gate_up, down), top_k, norm_topk)
    ref.backward(upstream.double())
    ref_grads = [x_ref.grad] + [p.grad for p in params]

    for fast, truth in zip([out.detach(), *fast_grads], [ref.detach(), *ref_grads], strict=True):
        assert truth is not None
        scale = float(truth.abs().max())
        torch.testing.assert_close(fast.double(), truth, rtol=0.0, atol=2e-6 * scale)
    # Dropless: every token reached exactly k experts.
    assert int(stats.tokens_per_expert_E.sum()) == 37 * top_k


def test_experts_with_no_tokens_get_zero_gradient() -> None:
    block = make_block(8, 1, 16, 8)
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.weight[3, 0] = 50.0  # every token with x[0] > 0 goes to expert 3
    x = torch.randn(20, 16).abs()
    out, stats = block(x)
    out.sum().backward()
    assert stats.tokens_per_expert_E.tolist() == [0, 0, 0, 20, 0, 0, 0, 0]
    grad = block.experts.gate_up_proj.grad
    assert grad is not None
    assert torch.count_nonzero(grad[3]) > 0
    assert torch.count_nonzero(grad[torch.arange(8) != 3]) == 0


def test_selection_bias_changes_choice_not_weights() -> None:
    block = make_block(8, 2, 16, 8)
    x = torch.randn(10, 16)
    _, scores0, weights, experts = block.gate(x)
    torch.testing.assert_close(weights, torch.topk(scores0, 2, dim=-1).values)
    with torch.no_grad():
        block.gate.selection_bias_E[7] = 10.0
    _, scores, biased_weights, biased_experts = block.gate(x)
    assert (biased_experts == 7).any(dim=-1).all()
    assert not torch.equal(experts, biased_experts)
    torch.testing.assert_close(biased_weights, scores.gather(-1, biased_experts))


def test_padding_tokens_are_left_out_of_router_stats() -> None:
    block = make_block(8, 2, 16, 8)
    x = torch.randn(12, 16)
    valid = torch.tensor([True] * 7 + [False] * 5)
    _, stats = block(x, valid)
    assert stats.scores_TE.shape == (7, 8)
    assert int(stats.tokens_per_expert_E.sum()) == 14


@pytest.mark.parametrize("shape", [((64, 32), (4, 32, 16)), ((30, 6), (3, 6, 5))])
def test_grouped_mm_helper_matches_loop(shape: tuple[tuple[int, int], tuple[int, int, int]]) -> None:
    a_shape, b_shape = shape
    a, b = torch.randn(*a_shape), torch.randn(*b_shape)
    rows = a_shape[0]
    offs = torch.tensor([*[rows // 4, rows // 4, rows // 2][: b_shape[0] - 1], rows], dtype=torch.int32)
    out = _grouped_mm(a, b, offs)
    bounds = [0, *offs.tolist()]
    expected = torch.cat([a[bounds[g]:bounds[g + 1]] @ b[g] for g in range(b_shape[0])])
    torch.testing.assert_close(out, expected)
