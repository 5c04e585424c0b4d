"""The model: exact forward semantics (against an independent naive statement of reference §2), shapes,
meta-device build, parameter counts, and clear errors for bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dlmoe.errors import ConfigError, ModelInputError
from dlmoe.export import to_hf
from dlmoe.model import DiffusionMoE, ModelConfig, build_model, count_parameters, get_flavor
from dlmoe.model.layers import RMSNorm

from .naive_reference import naive_forward

VARIANTS = {
    "debug-gqa": {},
    "mha-partial-rotary": {"num_key_value_heads": 4, "partial_rotary_factor": 0.5},
    "shared-expert-dense-layer": {"num_hidden_layers": 3, "moe_layer_freq": [1, 0, 1],
                                  "shared_expert_intermediate_size": 48},
    "no-qk-norm-renorm-topk": {"qk_layernorm": False, "norm_topk_prob": True, "num_key_value_heads": 1},
    "tied-theta": {"tie_word_embeddings": True, "rope_theta": 50000.0, "num_experts_per_tok": 3},
    "clip-qkv-after-qk-norm": {"clip_qkv": 0.5},
}


def small_model(seed: int = 0, **changes: object) -> DiffusionMoE:
    cfg = dataclasses.replace(get_flavor("debug"), **changes)  # type: ignore[arg-type]
    model = build_model(cfg, seed=seed)
    with torch.no_grad():  # non-trivial norm weights so that every scale in the forward is exercised
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_naive_reference(variant: str) -> None:
    model = small_model(**VARIANTS[variant])
    ids = torch.randint(0, model.config.vocab_size, (3, 19), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fast = model(ids).logits
        slow = naive_forward(model.config, to_hf(model.state_dict(), model.config), ids)
    assert fast.shape == (3, 19, model.config.vocab_size)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_padding_mask_hides_padded_keys_only() -> None:
    model = small_model()
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        ref = naive_forward(model.config, to_hf(model.state_dict(), model.config), ids, attention_mask=mask)
        changed = ids.clone()
        changed[1, 9] = (changed[1, 9] + 1) % 256
        out_changed = model(changed, attention_mask=mask)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
    # A padded token never influences the real positions.
    torch.testing.assert_close(out.logits[1, :8], out_changed.logits[1, :8])
    assert sum(int(s.tokens_per_expert_E.sum()) for s in out.router_stats) == 2 * (12 + 8) * 2


def test_attention_is_bidirectional() -> None:
    model = small_model()
    ids = torch.randint(0, 256, (1, 10))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 7) % 256
    with torch.no_grad():
        first = model(ids).logits[0, 0]
        second = model(changed).logits[0, 0]
    assert not torch.allclose(first, second)


def test_router_stats_per_moe_layer_and_gradients_flow() -> None:
    model = small_model(num_hidden_layers=3, moe_layer_freq=[1, 0, 1])
    out = model(torch.randint(0, 256, (2, 8)))
    assert len(out.router_stats) == 2
    for stats in out.router_stats:
        assert stats.logits_TE.shape == (16, 8)
        assert stats.logits_TE.dtype == torch.float32
        assert int(stats.tokens_per_expert_E.sum()) == 16 * 2
    out.logits.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_activation_checkpointing_gives_the_same_loss_and_gradients() -> None:
    def loss_and_grads(recompute: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)  # small_model draws its norm weights from the global generator
        model = small_model(num_hidden_layers=3, moe_layer_freq=[1, 0, 1], shared_expert_intermediate_size=48)
        model.activation_checkpointing = recompute
        out = model(torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1)))
        # The router statistics leave the checkpointed layers too: the balance-loss path must backpropagate.
        loss = out.logits.float().pow(2).mean() + sum(s.logits_TE.logsumexp(-1).pow(2).mean()
                                                      for s in out.router_stats)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    stored, recomputed = loss_and_grads(False), loss_and_grads(True)
    assert torch.equal(stored[0], recomputed[0])
    assert stored[1].keys() == recomputed[1].keys()
    for name, grad in stored[1].items():
        torch.testing.assert_close(recomputed[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_rmsnorm_computes_in_float32_then_casts_before_weight() -> None:
    norm = RMSNorm(8, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.fill_(3.0)
    x = torch.randn(4, 8).to(torch.bfloat16)
    x32 = x.float()
    expected = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * norm.weight
    assert norm(x).dtype == torch.bfloat16
    assert torch.equal(norm(x), expected)


def test_bf16_forward_runs() -> None:
    model = small_model().to(torch.bfloat16)
    out = model(torch.randint(0, 256, (2, 8)))
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.logits.float()).all()


def test_builds_on_meta_and_counts_release_parameters() -> None:
    model = build_model(get_flavor("llada-moe-7b-a1b"), device="meta")
    assert model.lm_head.weight.is_meta
    counts = count_parameters(model)
    assert abs(counts["total_params"] - 7.357e9) / 7.357e9 < 1e-3
    assert abs(counts["active_params"] - 1.4e9) / 1.4e9 < 0.01
    assert model.config.num_experts == 64


def test_release_module_names_for_autoep() -> None:
    model = build_model(get_flavor("debug"), device="meta")
    names = dict(model.named_parameters())
    assert "model.layers.0.mlp.gate.weight" in names
    assert names["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 64)
    assert names["model.layers.0.mlp.experts.down_proj"].shape == (8, 64, 32)
    block = model.model.layers[0].mlp
    assert (block.num_experts, block.num_experts_per_tok) == (8, 2)
    assert isinstance(model.config, ModelConfig)


def test_same_seed_same_weights() -> None:
    a, b = build_model(get_flavor("debug"), seed=3), build_model(get_flavor("debug"), seed=3)
    c = build_model(get_flavor("debug"), seed=4)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


@pytest.mark.parametrize(
    ("ids", "needle"),
    [
        (torch.tensor([[1, 2, 264]]), "vocab"),
        (torch.tensor([[-1, 2]]), "vocab"),
        (torch.zeros(1, 513, dtype=torch.long), "max_position_embeddings"),
        (torch.zeros(4, dtype=torch.long), "batch, seq_len"),
        (torch.zeros(1, 4), "integer"),
    ],
)
def test_bad_inputs_raise_model_input_error(ids: torch.Tensor, needle: str) -> None:
    model = small_model()
    with pytest.raises(ModelInputError, match=needle):
        model(ids)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"num_experts_per_tok": 9}, "model.num_experts_per_tok"),
        ({"hidden_size": 66}, "model.num_attention_heads"),
        ({"num_key_value_heads": 3}, "model.num_key_value_heads"),
        ({"moe_layer_freq": [1]}, "model.moe_layer_freq"),
        ({"hidden_act": "gelu"}, "model.hidden_act"),
        ({"attention_bias": True}, "model.attention_bias"),
        ({"partial_rotary_factor": 0.0}, "model.partial_rotary_factor"),
    ],
)
def test_bad_geometry_is_refused_at_build(changes: dict[str, object], key: str) -> None:
    cfg = dataclasses.replace(get_flavor("debug"), **changes)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        build_model(cfg, device="meta")
    assert info.value.key == key


def test_unknown_flavor() -> None:
    with pytest.raises(ConfigError, match="unknown flavor 'gpt5'"):
        get_flavor("gpt5")
