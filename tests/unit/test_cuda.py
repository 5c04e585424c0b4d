"""The GPU variants: the model in bf16 on CUDA against fp32 on the CPU, and the MoE block on CUDA (bf16 through
``torch._grouped_mm``'s CUTLASS kernel, fp32 through its fallback) against the per-expert loop. Skipped without
CUDA: they cost nothing in CPU CI and run on a GPU machine through ``bench/gpu_suite.sh``.

bf16 moves the router's choice for tokens whose k-th and (k+1)-th probabilities nearly tie, and such a token's
output then differs by O(1), by design. The model test therefore routes every token to every expert (top-k = E:
no choice to move); the block test compares the tokens whose experts agree, and gives the others no upstream
gradient, so that they add nothing to the weight gradients of either side.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dlmoe.diffusion import MaskedDiffusionObjective, ObjectiveSettings
from dlmoe.model import DiffusionMoE, MoEBlock, build_model, get_flavor

from .naive_reference import naive_moe, split_experts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64, on the CPU."""
    got64, want64 = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got64 - want64).norm() / want64.norm())


def dense_routing_model() -> DiffusionMoE:
    """The debug geometry with top-k = all 8 experts, and a shared expert and a dense layer as in the release."""
    config = dataclasses.replace(get_flavor("debug"), num_hidden_layers=3, moe_layer_freq=[1, 0, 1],
                                 num_experts_per_tok=8, shared_expert_intermediate_size=48)
    model = build_model(config, seed=0)
    with torch.no_grad():  # non-trivial norm weights, as in test_model.py
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    return model


def test_model_bf16_on_cuda_matches_fp32_on_cpu() -> None:
    reference = dense_routing_model()
    fast = dense_routing_model().to("cuda", torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 256, (2, 64), generator=gen)
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, 40:] = 0  # padding: the masked attention path
    upstream = torch.randn(2, 64, reference.config.vocab_size, generator=gen)

    ref_out = reference(ids, attention_mask=mask)
    (ref_out.logits * upstream).sum().backward()
    out = fast(ids.cuda(), attention_mask=mask.cuda())
    assert out.logits.dtype == torch.bfloat16 and out.logits.is_cuda
    (out.logits.float() * upstream.cuda()).sum().backward()

    # Calibrated on the CPU's bf16 arithmetic: 1.2e-2 for the logits, at most 1.7e-2 for the router
    # probabilities and 2.7e-2 for a gradient.
    assert relative_error(out.logits, ref_out.logits) < 3e-2
    for got, want in zip(out.router_stats, ref_out.router_stats, strict=True):
        assert relative_error(got.scores_TE, want.scores_TE) < 3e-2
        assert torch.equal(got.tokens_per_expert_E.cpu(), want.tokens_per_expert_E)
    for (name, param), ref_param in zip(fast.named_parameters(), reference.parameters(), strict=True):
        assert param.grad is not None and ref_param.grad is not None, name
        assert relative_error(param.grad, ref_param.grad) < 6e-2, name


def test_objective_loss_bf16_on_cuda_matches_fp32_on_cpu() -> None:
    settings = ObjectiveSettings(mask_token_id=get_flavor("debug").mask_token_id, seed=3, global_batch_size=4,
                                 variable_length_prob=0.0)
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(4))
    index = torch.arange(4)
    ref = MaskedDiffusionObjective(settings)(dense_routing_model(), ids, index, epoch=0)
    out = MaskedDiffusionObjective(settings)(dense_routing_model().to("cuda", torch.bfloat16), ids.cuda(), index,
                                             epoch=0)
    assert out.masked_tokens == ref.masked_tokens > 0
    for part in ("loss", "diffusion_loss", "balance_loss", "z_loss"):
        assert relative_error(getattr(out, part), getattr(ref, part)) < 2e-2, part


def moe_block(dtype: torch.dtype) -> MoEBlock:
    config = dataclasses.replace(get_flavor("debug"), hidden_size=128, num_attention_heads=1,
                                 num_key_value_heads=1, num_experts=16, num_experts_per_tok=4,
                                 expert_intermediate_size=64)
    block = MoEBlock(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return block.to("cuda", dtype)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_moe_block_on_cuda_matches_per_expert_loop(dtype: torch.dtype, tolerance: float) -> None:
    block = moe_block(dtype)
    gen = torch.Generator().manual_seed(1)
    # 200 tokens × top-4 over 16 experts; rows of 128 and 64 elements keep torch._grouped_mm's 16-byte rule.
    x = torch.randn(200, 128, generator=gen).to("cuda", dtype).requires_grad_(True)
    upstream = torch.randn(200, 128, generator=gen).cuda()

    out, stats = block(x)
    x_ref = x.detach().double().requires_grad_(True)
    gate_w, gate_up, down = (p.detach().double().requires_grad_(True) for p in block.parameters())
    ref = naive_moe(x_ref, gate_w, split_experts(gate_up, down), top_k=4)
    ref_chosen = torch.topk(torch.softmax(x_ref.detach() @ gate_w.detach().t(), -1), 4, dim=-1).indices
    same = (stats.experts_TK.sort(-1).values == ref_chosen.sort(-1).values).all(-1)
    assert int(same.sum()) >= 180, f"only {int(same.sum())} of 200 tokens routed alike: the test compares nothing"
    assert int(stats.tokens_per_expert_E.sum()) == 200 * 4

    keep = same[:, None].to(upstream.dtype)
    (out.float() * upstream * keep).sum().backward()
    (ref * (upstream * keep).double()).sum().backward()
    assert relative_error(out[same], ref[same]) < tolerance
    assert x.grad is not None and x_ref.grad is not None
    assert relative_error(x.grad[same], x_ref.grad[same]) < tolerance
    for param, ref_param in zip(block.parameters(), (gate_w, gate_up, down), strict=True):
        assert param.grad is not None and ref_param.grad is not None
        assert relative_error(param.grad, ref_param.grad) < tolerance


def test_moe_block_on_cuda_with_empty_experts() -> None:
    """Groups of zero rows (experts nobody chose) in the CUTLASS kernel: zero gradients, and no garbage."""
    block = moe_block(torch.bfloat16)
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.weight[3, 0] = 5.0
        block.gate.weight[9, 1] = 5.0
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    x[:, :2] = x[:, :2].abs() + 3.0  # experts 3 and 9 lead every token by at least e^15
    x = x.to("cuda", torch.bfloat16)
    out, stats = block(x)
    out.float().sum().backward()
    counts = stats.tokens_per_expert_E.cpu()
    assert int(counts[3]) == int(counts[9]) == 64 and int(counts.sum()) == 64 * 4
    assert int((counts == 0).sum()) >= 10
    gate_w, gate_up, down = (p.detach().double() for p in block.parameters())
    # The two tied picks per token weigh below 1e-6: whichever experts the kernels pick, they add nothing.
    ref = naive_moe(x.double(), gate_w, split_experts(gate_up, down), top_k=4)
    assert relative_error(out, ref) < 2e-2
    grad = block.experts.gate_up_proj.grad
    assert grad is not None
    assert torch.count_nonzero(grad[3]) > 0 and torch.count_nonzero(grad[9]) > 0
    assert torch.count_nonzero(grad[(counts == 0).cuda()]) == 0
