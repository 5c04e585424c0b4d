"""The Monte-Carlo likelihood: exact where the bound is exact (one answer token), stratified, seeded, independent of
the batch size, and on the model trained on the copy language it prefers the true continuation to wrong ones."""

from __future__ import annotations

import pytest
import torch

from dlmoe.diffusion import LikelihoodSettings, continuation_log_likelihood
from dlmoe.diffusion.likelihood import masked_counts
from dlmoe.errors import ModelInputError
from dlmoe.model import DiffusionMoE, build_model, get_flavor
from dlmoe.model.config import BYTE_EOS_ID, BYTE_MASK_ID
from dlmoe.train.copy_task import LETTERS

from .conftest import TASK


def test_one_answer_token_gives_the_exact_log_probability() -> None:
    model = build_model(get_flavor("debug"), seed=0).eval()
    prompt, answer = [10, 20, 30], [40]
    estimate = continuation_log_likelihood(model, prompt, answer, mask_id=BYTE_MASK_ID,
                                           settings=LikelihoodSettings(samples=3))
    with torch.no_grad():
        logits = model(torch.tensor([[*prompt, BYTE_MASK_ID]])).logits[0, -1]
    assert estimate == pytest.approx(float(torch.log_softmax(logits.float(), -1)[40]), rel=1e-6)


def test_masked_counts_are_stratified_over_one_to_the_length() -> None:
    counts = masked_counts(24, 24, torch.Generator().manual_seed(5))
    assert sorted(counts.tolist()) == list(range(1, 25))
    assert set(masked_counts(100, 7, torch.Generator().manual_seed(1)).tolist()) == set(range(1, 8))


def test_seeded_and_independent_of_the_batch_size() -> None:
    model = build_model(get_flavor("debug"), seed=0).eval()
    prompt, answer = [1, 2, 3, 4], [5, 6, 7, 8, 9, 10]

    def score(**settings: int) -> float:
        return continuation_log_likelihood(model, prompt, answer, mask_id=BYTE_MASK_ID,
                                           settings=LikelihoodSettings(samples=12, **settings))

    assert score(batch_size=12) == pytest.approx(score(batch_size=5), rel=1e-9)
    assert score(seed=3) == score(seed=3) != score(seed=4)


def test_the_true_continuation_scores_above_wrong_ones(copy_model: DiffusionMoE) -> None:
    prompts, words = TASK.sample(8, torch.Generator().manual_seed(123))
    settings = LikelihoodSettings(samples=16, batch_size=16)
    pad = TASK.answer_length - TASK.word_length
    for prompt, word in zip(prompts, words, strict=True):
        true = continuation_log_likelihood(copy_model, prompt, word + [BYTE_EOS_ID] * pad, mask_id=BYTE_MASK_ID,
                                           settings=settings)
        one_letter_off = [*word[:-1], LETTERS[(LETTERS.index(word[-1]) + 1) % len(LETTERS)]]
        reversed_word = word[::-1] if word[::-1] != word else one_letter_off
        for wrong in (one_letter_off, reversed_word, word[1:] + word[:1]):
            if wrong == word:
                continue
            score = continuation_log_likelihood(copy_model, prompt, wrong + [BYTE_EOS_ID] * pad,
                                                mask_id=BYTE_MASK_ID, settings=settings)
            assert true > score, (bytes(prompt), bytes(wrong))
        assert true > -1.0  # the trained model is nearly sure of the copy


@pytest.mark.parametrize(("answer", "settings", "message"), [
    ([], LikelihoodSettings(), "the answer is empty"),
    ([1, BYTE_MASK_ID], LikelihoodSettings(), "holds the mask id"),
    ([1], LikelihoodSettings(samples=0), "samples must be at least 1"),
    ([1], LikelihoodSettings(batch_size=0), "batch_size must be at least 1"),
])
def test_bad_inputs_are_named(answer: list[int], settings: LikelihoodSettings, message: str) -> None:
    model = build_model(get_flavor("debug"), seed=0).eval()
    with pytest.raises(ModelInputError, match=message):
        continuation_log_likelihood(model, [1, 2], answer, mask_id=BYTE_MASK_ID, settings=settings)
