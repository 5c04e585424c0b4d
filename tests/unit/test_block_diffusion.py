"""Block diffusion (LLaDA 2.0): the attention pattern, the objective against hand-computed values, the noise range,
the block-level WSD schedule, the sampler's block-causal decoding and the config keys."""

from __future__ import annotations

import math
import re

import pytest
import torch

from dlmoe.cli import _decode_as_trained
from dlmoe.config import JOBS_DIR, load_job_config
from dlmoe.diffusion import GenerationSettings, MaskedDiffusionObjective, ObjectiveSettings, draw_noise, generate
from dlmoe.diffusion.blocks import BlockSchedule, block_causal_pattern, block_diffusion_pattern
from dlmoe.errors import ConfigError
from dlmoe.model import ModelOutput, build_model, get_flavor
from dlmoe.train.step import block_schedule

MASK = 258


def test_pattern_of_two_blocks_of_two() -> None:
    # rows: queries x_t[0..3] then x0[0..3]; columns: keys x_t[0..3] then x0[0..3]
    expected = [
        [1, 1, 0, 0, 0, 0, 0, 0],  # noised block 0: itself only (M_BD)
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],  # noised block 1: itself and clean block 0 (M_OBC)
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],  # clean block 0: clean blocks <= 0 (M_BC)
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],  # clean block 1: clean blocks <= 1
        [0, 0, 0, 0, 1, 1, 1, 1],
    ]
    assert block_diffusion_pattern(4, 2)[0, 0].int().tolist() == expected
    assert block_diffusion_pattern(3, 2)[0, 0].shape == (6, 6)  # a shorter last block
    assert block_causal_pattern(torch.tensor([0, 1, 1]))[0, 0].int().tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 1]]


class _Uniform(torch.nn.Module):
    """Zero logits over 4 tokens (CE = log 4 everywhere); records what it is fed."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, torch.Tensor | None]] = []

    def forward(self, ids: torch.Tensor, attention_pattern: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> ModelOutput:
        self.calls.append({"ids": ids, "pattern": attention_pattern, "positions": position_ids})
        return ModelOutput(logits=torch.zeros(*ids.shape, 4, requires_grad=True))


def _settings(**changes: object) -> ObjectiveSettings:
    settings = ObjectiveSettings(mask_token_id=3, seed=0, global_batch_size=2, variable_length_prob=0.0,
                                 aux_loss_coef=0.0, z_loss_coef=0.0)
    for key, value in changes.items():
        setattr(settings, key, value)
    return settings


def test_block_objective_hand_value() -> None:
    model = _Uniform()
    x0 = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0]])
    objective = MaskedDiffusionObjective(_settings(block_size=4))
    out = objective(model, x0, torch.arange(2), epoch=0)
    call = model.calls[0]
    noise = objective.noise(torch.arange(2), 6, 0)
    masked = noise.masked()
    x_t = torch.where(masked, torch.full_like(x0, 3), x0)
    assert call["ids"] is not None and torch.equal(call["ids"], torch.cat([x_t, x0], 1))  # [x_t ‖ x0]
    assert call["positions"] is not None and call["positions"].tolist() == [[0, 1, 2, 3, 4, 5] * 2]
    assert call["pattern"] is not None and torch.equal(call["pattern"], block_diffusion_pattern(6, 4))
    # the paper's ELBO: sum over masked tokens of CE / p_mask (weight 1/t), over all B * L positions
    expected = sum(math.log(4) / noise.p_mask_B[b].item() * masked[b].sum().item() for b in range(2)) / 12
    assert out.diffusion_loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.seq_len == 6 and out.masked_tokens == int(masked.sum())


def test_block_as_long_as_the_row_is_plain_masked_diffusion() -> None:
    torch.manual_seed(0)
    model = build_model(get_flavor("debug"))
    x0 = torch.randint(0, 256, (2, 16))
    plain = MaskedDiffusionObjective(_settings(mask_token_id=MASK))(model, x0, torch.arange(2), 0)
    whole = MaskedDiffusionObjective(_settings(mask_token_id=MASK, block_size=16))(model, x0, torch.arange(2), 0)
    assert whole.loss.item() == plain.loss.item()


def test_a_noised_block_sees_the_clean_prefix_and_itself_only() -> None:
    torch.manual_seed(0)
    model = build_model(get_flavor("debug")).eval()
    x0 = torch.randint(0, 256, (1, 8))
    x_t = x0.clone()
    x_t[0, [1, 5, 6]] = MASK
    objective = MaskedDiffusionObjective(_settings(mask_token_id=MASK, block_size=4))
    with torch.no_grad():
        logits = objective.forward_model(model, x_t, x0, None).logits
        # block 1 as the sampler decodes it: clean block 0, then the noised block 1, under the block-causal pattern
        prefix = torch.cat([x0[:, :4], x_t[:, 4:]], 1)
        decoded = model(prefix, attention_pattern=block_causal_pattern(torch.arange(8) // 4)).logits
        first_alone = model(x_t[:, :4]).logits
        changed = x0.clone()
        changed[0, 7] = (changed[0, 7] + 1) % 256  # the clean token of the block itself: never visible to it
        same = objective.forward_model(model, x_t, changed, None).logits
    torch.testing.assert_close(logits[:, 4:], decoded[:, 4:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:, :4], first_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(same, logits, rtol=1e-5, atol=1e-5)


def test_noise_range() -> None:
    index = torch.arange(64)
    for stratify in (None, 64):
        noise = draw_noise(index, 8, seed=1, epoch=0, eps=0.0, stratify_batch_size=stratify, t_range=(0.3, 0.8))
        assert bool(((noise.t_B >= 0.3) & (noise.t_B < 0.8)).all())
        assert noise.t_B.max().item() > 0.7 and noise.t_B.min().item() < 0.4
    full = draw_noise(index, 8, seed=1, epoch=0)
    assert torch.equal(full.t_B, draw_noise(index, 8, seed=1, epoch=0, t_range=(0.0, 1.0)).t_B)
    with pytest.raises(ValueError, match="t_min < t_max"):
        draw_noise(index, 8, seed=1, epoch=0, t_range=(0.5, 0.5))


def test_block_schedule_three_phases() -> None:
    schedule = BlockSchedule(total_steps=20, warmup_steps=6, decay_steps=4, start_block_size=1, final_block_size=32)
    sizes = [schedule.block_size_at(step, 128) for step in range(20)]
    # warm-up: doublings 1..64 in equal shares of 6 steps; stable: full sequence (0); decay: 64, then 32
    assert sizes == [1, 2, 4, 8, 16, 32] + [0] * 10 + [64, 64, 32, 32]
    assert BlockSchedule(10, 0, 0).block_size_at(5, 128) == 0


def test_sampler_block_causal_decoding_ignores_later_blocks() -> None:
    torch.manual_seed(0)
    model = build_model(get_flavor("debug")).eval()
    prompts = [[5, 6, 7], [9]]
    settings = GenerationSettings(gen_length=8, block_length=4, steps=8, block_causal=True, stop_at_eos=False)
    both = generate(model, prompts, settings, mask_id=MASK, eos_id=256, pad_id=257)
    short = GenerationSettings(gen_length=4, block_length=4, steps=4, block_causal=True, stop_at_eos=False)
    first = generate(model, prompts, short, mask_id=MASK, eos_id=256, pad_id=257)
    assert [a[:4] for a in both.answers] == first.answers  # block 0 never saw the masks of block 1
    alone = generate(model, [prompts[1]], settings, mask_id=MASK, eos_id=256, pad_id=257)
    assert alone.answers[0] == both.answers[1]  # left padding is invisible


def test_config_keys() -> None:
    job = load_job_config(None, ["objective.block_size=32", "objective.t_min=0.3", "objective.t_max=0.8"])
    assert job.objective.block_size == 32 and job.objective.t_min == 0.3
    with pytest.raises(ConfigError, match=re.escape("objective.t_max")):
        load_job_config(None, ["objective.t_min=0.5", "objective.t_max=0.4"])
    with pytest.raises(ConfigError, match=re.escape("objective.block_size")):
        load_job_config(None, ["objective.block_size=8", "objective.block_schedule.enabled=true"])
    with pytest.raises(ConfigError, match=re.escape("objective.block_schedule.decay_steps")):
        load_job_config(None, ["train.steps=10", "train.warmup_steps=1", "objective.block_schedule.enabled=true",
                               "objective.block_schedule.warmup_steps=6", "objective.block_schedule.decay_steps=6"])
    with pytest.raises(ConfigError, match=re.escape("objective.document_attention")):
        load_job_config(None, ["objective.kind=sft", "objective.document_attention=true"])
    with pytest.raises(ConfigError, match=re.escape("objective.block_schedule.final_block_size")):
        load_job_config(None, ["objective.block_schedule.enabled=true",
                               "objective.block_schedule.final_block_size=128"])


def test_the_job_yaml_schedule_recipe_and_decoding_as_trained() -> None:
    job = load_job_config(JOBS_DIR / "llada2-block.yaml")
    schedule = block_schedule(job)
    assert schedule is not None and schedule.block_size_at(0, job.data.seq_len) == 4
    assert schedule.block_size_at(job.train.steps - 1, job.data.seq_len) == 32
    recipe = job.objective.recipe()
    assert recipe["block_size"] == 32 and recipe["document_attention"] and recipe["noise_range"] == [0.3, 0.8]
    assert load_job_config().objective.recipe() == {} and block_schedule(load_job_config()) is None
    settings = GenerationSettings(gen_length=64, block_length=32, steps=64)
    _decode_as_trained(settings, {"training": recipe})
    assert settings.block_causal
    with pytest.warns(UserWarning, match="trained with blocks of 32 tokens; decoding with --block-length 8"):
        _decode_as_trained(GenerationSettings(gen_length=64, block_length=8, steps=64), {"training": recipe})
    plain = GenerationSettings()
    _decode_as_trained(plain, {})
    assert not plain.block_causal
