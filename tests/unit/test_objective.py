"""The masked-diffusion objective and its noise, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from dlmoe.diffusion import (
    MaskedDiffusionObjective,
    ObjectiveSettings,
    cut_length,
    draw_noise,
    pretrain_loss,
    response_mask,
    sft_loss,
)
from dlmoe.model import build_model, get_flavor

LOG2 = math.log(2.0)


def test_pretrain_loss_hand_value() -> None:
    logits = torch.zeros(1, 2, 2)  # CE = log 2 at every position
    x0 = torch.tensor([[0, 1]])
    masked = torch.tensor([[True, False]])
    # (log2 / 0.5) / (B * L = 2)
    assert pretrain_loss(logits, x0, masked, torch.tensor([0.5])).item() == pytest.approx(LOG2)


def test_pretrain_loss_divides_by_all_positions_not_masked_count() -> None:
    logits = torch.zeros(2, 4, 2)
    x0 = torch.zeros(2, 4, dtype=torch.long)
    masked = torch.zeros(2, 4, dtype=torch.bool)
    masked[0, 0] = True
    masked[1, :] = True
    p = torch.tensor([0.25, 1.0])
    expected = (LOG2 / 0.25 + 4 * LOG2 / 1.0) / 8
    assert pretrain_loss(logits, x0, masked, p).item() == pytest.approx(expected)


def test_sft_loss_hand_value() -> None:
    logits = torch.zeros(2, 4, 2)
    x0 = torch.zeros(2, 4, dtype=torch.long)
    prompt_len = torch.tensor([1, 2])
    masked = response_mask(prompt_len, 4)
    p = torch.tensor([0.5, 1.0])
    # sample 0: 3 masked * log2 / 0.5 over 3 response tokens = 2 log2; sample 1: 2 * log2 / 2 = log2
    assert sft_loss(logits, x0, masked, p, prompt_len).item() == pytest.approx(1.5 * LOG2)


def test_cross_entropy_uses_the_true_token() -> None:
    logits = torch.tensor([[[2.0, 0.0, 0.0]]])
    x0 = torch.tensor([[1]])
    expected = -torch.log_softmax(logits[0, 0], -1)[1].item()
    assert pretrain_loss(logits, x0, torch.tensor([[True]]), torch.tensor([1.0])).item() == pytest.approx(expected)


def test_noise_is_a_pure_function_of_seed_epoch_and_index() -> None:
    both = draw_noise(torch.tensor([5, 9]), 16, seed=1, epoch=0)
    five = draw_noise(torch.tensor([5]), 16, seed=1, epoch=0)
    nine = draw_noise(torch.tensor([9]), 16, seed=1, epoch=0)
    torch.testing.assert_close(both.uniform_BL, torch.cat([five.uniform_BL, nine.uniform_BL]))
    torch.testing.assert_close(both.t_B, torch.cat([five.t_B, nine.t_B]))
    assert not torch.equal(draw_noise(torch.tensor([5]), 16, seed=1, epoch=1).uniform_BL, five.uniform_BL)
    assert not torch.equal(draw_noise(torch.tensor([5]), 16, seed=2, epoch=0).uniform_BL, five.uniform_BL)
    assert not torch.equal(five.uniform_BL, nine.uniform_BL)


def test_two_ranks_see_the_same_noise_as_one() -> None:
    global_batch = torch.arange(8, 16)
    whole = draw_noise(global_batch, 32, seed=7, epoch=3)
    rank0 = draw_noise(global_batch[:4], 32, seed=7, epoch=3)
    rank1 = draw_noise(global_batch[4:], 32, seed=7, epoch=3)
    torch.testing.assert_close(whole.masked(), torch.cat([rank0.masked(), rank1.masked()]))


def test_p_mask_range_and_mask_rate() -> None:
    noise = draw_noise(torch.arange(200), 4000, seed=0, epoch=0, eps=1e-3)
    assert (noise.p_mask_B >= 1e-3).all() and (noise.p_mask_B <= 1.0).all()
    torch.testing.assert_close(noise.p_mask_B, (1 - 1e-3) * noise.t_B + 1e-3)
    rate = noise.masked().float().mean(-1)
    assert (rate - noise.p_mask_B).abs().max() < 0.05


def test_stratified_t_is_evenly_spaced_within_a_global_batch() -> None:
    noise = draw_noise(torch.arange(4, 8), 8, seed=0, epoch=0, stratify_batch_size=4)
    t = noise.t_B.double()
    offsets = (t - t[0]) % 1.0
    torch.testing.assert_close(offsets, torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=torch.float64), atol=1e-6,
                               rtol=0)
    other = draw_noise(torch.arange(8, 12), 8, seed=0, epoch=0, stratify_batch_size=4).t_B
    assert not torch.allclose(other, noise.t_B)


def test_cut_length_is_deterministic_and_rare() -> None:
    lengths = [cut_length(64, seed=3, epoch=0, step=s, probability=0.01) for s in range(3000)]
    assert lengths == [cut_length(64, seed=3, epoch=0, step=s, probability=0.01) for s in range(3000)]
    cut = [n for n in lengths if n != 64]
    assert 5 <= len(cut) <= 70
    assert all(1 <= n <= 64 for n in lengths)
    always = {cut_length(8, seed=3, epoch=0, step=s, probability=1.0) for s in range(400)}
    assert always == set(range(1, 9))
    assert cut_length(64, seed=3, epoch=0, step=1, probability=0.0) == 64


def _objective(**changes: object) -> MaskedDiffusionObjective:
    settings = ObjectiveSettings(mask_token_id=258, seed=0, global_batch_size=4, variable_length_prob=0.0)
    for key, value in changes.items():
        setattr(settings, key, value)
    return MaskedDiffusionObjective(settings)


class _Recorder(torch.nn.Module):
    """Wraps the model to capture what it is fed."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = build_model(get_flavor("debug"))
        self.seen: list[torch.Tensor] = []

    def forward(self, ids: torch.Tensor):  # type: ignore[no-untyped-def]
        self.seen.append(ids.clone())
        return self.inner(ids)


def test_objective_masks_with_mask_token_and_combines_losses() -> None:
    model = _Recorder()
    x0 = torch.randint(0, 256, (4, 32))
    objective = _objective()
    out = objective(model, x0, torch.arange(4), epoch=0)
    x_t = model.seen[0]
    masked = objective.noise(torch.arange(4), 32, 0).masked()
    assert torch.equal(x_t == 258, masked)
    assert torch.equal(x_t[~masked], x0[~masked])
    expected = out.diffusion_loss + 0.01 * out.balance_loss + 0.001 * out.z_loss
    torch.testing.assert_close(out.loss.detach(), expected)
    assert out.balance_loss.item() >= 1.0 - 1e-6  # the Switch loss is at least 1 (equality at perfect balance)
    out.loss.backward()


def test_sft_objective_never_masks_the_prompt() -> None:
    model = _Recorder()
    x0 = torch.randint(0, 256, (4, 16))
    prompt_len = torch.tensor([3, 8, 15, 0])
    out = _objective(sft=True, variable_length_prob=1.0)(model, x0, torch.arange(4), 0, prompt_len)
    x_t = model.seen[0]
    assert out.seq_len == 16  # the length cut does not apply to SFT
    for row, plen in enumerate(prompt_len.tolist()):
        assert torch.equal(x_t[row, :plen], x0[row, :plen])
    with pytest.raises(ValueError, match="prompt_len"):
        _objective(sft=True)(model, x0, torch.arange(4), 0)


def test_variable_length_cut_applies_to_whole_batch() -> None:
    model = _Recorder()
    x0 = torch.randint(0, 256, (4, 32))
    out = _objective(variable_length_prob=1.0)(model, x0, torch.arange(4), 0)
    assert model.seen[0].shape == (4, out.seq_len)
    assert 1 <= out.seq_len <= 32
