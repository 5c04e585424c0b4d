"""The sampler, tested for real: the debug model trained on the copy language must decode the exact answers,
with parallel decoding needing at least 3× fewer forward passes; plus the schedule, batching, EOS handling,
temperature and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from data_pipeline.tokenizers import byte_tokenizer
from dlmoe.cli import main
from dlmoe.diffusion import GenerationSettings, generate
from dlmoe.diffusion.sampler import _schedule
from dlmoe.errors import GenerationError
from dlmoe.export import save_pretrained
from dlmoe.model import DiffusionMoE, build_model, get_flavor
from dlmoe.model.config import BYTE_EOS_ID, BYTE_MASK_ID, BYTE_PAD_ID
from dlmoe.model.transformer import ModelOutput

from .conftest import TASK

IDS = {"mask_id": BYTE_MASK_ID, "eos_id": BYTE_EOS_ID, "pad_id": BYTE_PAD_ID}


@pytest.fixture(scope="module")
def held_out() -> tuple[list[list[int]], list[list[int]]]:
    return TASK.sample(24, torch.Generator().manual_seed(99))


def one_per_step(block: int = 8) -> GenerationSettings:
    return GenerationSettings(gen_length=TASK.answer_length, block_length=block, steps=TASK.answer_length)


def test_low_confidence_remasking_gives_the_exact_answers(copy_model: DiffusionMoE, held_out: tuple) -> None:
    prompts, answers = held_out
    result = generate(copy_model, prompts, one_per_step(), **IDS)
    assert result.answers == answers
    # Blocks 1 and 2 hold the word and its EOS; the third block is skipped once every sample has stopped.
    assert result.forward_passes == 16


def test_parallel_decoding_same_answers_with_3x_fewer_passes(copy_model: DiffusionMoE, held_out: tuple) -> None:
    prompts, answers = held_out
    slow = generate(copy_model, prompts, one_per_step(), **IDS)
    settings = GenerationSettings(gen_length=TASK.answer_length, block_length=8, threshold=0.9)
    fast = generate(copy_model, prompts, settings, **IDS)
    assert fast.answers == slow.answers == answers
    assert fast.forward_passes * 3 <= slow.forward_passes, (fast.forward_passes, slow.forward_passes)


def test_batch_of_different_prompt_lengths_decodes_as_each_alone(copy_model: DiffusionMoE, held_out: tuple) -> None:
    prompts, _ = held_out
    assert len({len(p) for p in prompts}) > 1
    for settings in (one_per_step(), GenerationSettings(gen_length=24, block_length=24, threshold=0.9)):
        together = generate(copy_model, prompts[:6], settings, **IDS)
        alone = [generate(copy_model, [p], settings, **IDS).answers[0] for p in prompts[:6]]
        assert together.answers == alone


def test_eos_stop_and_suppression(copy_model: DiffusionMoE, held_out: tuple) -> None:
    prompts, answers = held_out
    settings = one_per_step()
    settings.stop_at_eos = False
    full = generate(copy_model, prompts[:4], settings, **IDS)
    assert full.forward_passes == TASK.answer_length
    for answer, word in zip(full.answers, answers[:4], strict=True):
        assert answer == word + [BYTE_EOS_ID] * (TASK.answer_length - len(word))
    settings.suppress_eos = True
    suppressed = generate(copy_model, prompts[:4], settings, **IDS)
    for answer, word in zip(suppressed.answers, answers[:4], strict=True):
        assert BYTE_EOS_ID not in answer and len(answer) == TASK.answer_length
        assert answer[:len(word)] == word


def test_temperature_sampling_is_seeded() -> None:
    model = build_model(get_flavor("debug"), seed=1).eval()
    prompts = [[97, 98, 99]]
    hot = GenerationSettings(gen_length=16, block_length=16, steps=16, temperature=5.0, stop_at_eos=False)
    first = generate(model, prompts, hot, **IDS).answers
    assert generate(model, prompts, hot, **IDS).answers == first
    hot.seed = 1
    assert generate(model, prompts, hot, **IDS).answers != first


class ScriptedModel(nn.Module):
    """Logits that favour token 65 + position with a confidence rising along the sequence; records its inputs."""

    def __init__(self, vocab: int = 264, max_positions: int = 64) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.config = type("Config", (), {"max_position_embeddings": max_positions, "vocab_size": vocab})()
        self.vocab = vocab
        self.seen: list[torch.Tensor] = []

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ModelOutput:
        self.seen.append(ids.clone())
        batch, length = ids.shape
        logits = torch.zeros(batch, length, self.vocab)
        positions = torch.arange(length)
        logits[:, positions, 65 + positions % 26] = 1.0 + positions.float()
        return ModelOutput(logits=logits)


def test_schedule_commits_the_most_confident_positions_in_the_current_block_first() -> None:
    assert _schedule(10, 4) == [3, 3, 2, 2]
    assert _schedule(8, 8) == [1] * 8
    model = ScriptedModel()
    settings = GenerationSettings(gen_length=8, block_length=4, steps=4, stop_at_eos=False)
    result = generate(model, [[1, 2]], settings, **IDS)
    assert result.answers == [[65 + p % 26 for p in range(2, 10)]]
    assert result.forward_passes == 4
    # Within block 1 (positions 2..5) the rightmost (most confident) positions go first, two per pass; block 2
    # stays masked until block 1 is complete.
    masked_before = [(seen[0, 2:] == BYTE_MASK_ID).tolist() for seen in model.seen]
    assert masked_before[1] == [True, True, False, False] + [True] * 4
    assert masked_before[2] == [False] * 4 + [True] * 4


def test_threshold_commits_all_confident_positions_and_at_least_one() -> None:
    model = ScriptedModel()
    always = GenerationSettings(gen_length=8, block_length=8, threshold=0.01, stop_at_eos=False)
    assert generate(model, [[1]], always, **IDS).forward_passes == 1
    never = GenerationSettings(gen_length=8, block_length=8, threshold=1.0, stop_at_eos=False)
    assert generate(model, [[1]], never, **IDS).forward_passes == 8


@pytest.mark.parametrize(("changes", "message"), [
    ({"gen_length": 10, "block_length": 4}, "gen_length 10 is not divisible by block_length 4"),
    ({"gen_length": 8, "block_length": 4, "steps": 5}, "steps 5 is not a positive multiple of the number of blocks 2"),
    ({"gen_length": 8, "block_length": 4, "steps": 16}, "steps per block 8 exceeds block_length 4"),
    ({"gen_length": 8, "block_length": 8, "threshold": 1.5}, r"threshold must lie in \(0, 1\]"),
    ({"gen_length": 8, "block_length": 8, "steps": 8, "temperature": -1.0}, "temperature must be"),
    ({"gen_length": 60, "block_length": 60, "steps": 60}, "exceeds the model's context of 64 positions"),
])
def test_bad_settings_are_named(changes: dict[str, object], message: str) -> None:
    settings = GenerationSettings(**changes)  # type: ignore[arg-type]
    with pytest.raises(GenerationError, match=message):
        generate(ScriptedModel(), [[1, 2, 3, 4, 5]], settings, **IDS)


def test_bad_prompts_are_named() -> None:
    settings = GenerationSettings(gen_length=8, block_length=8, steps=8)
    with pytest.raises(GenerationError, match="prompt 1 holds the mask token id 258"):
        generate(ScriptedModel(), [[1], [2, BYTE_MASK_ID]], settings, **IDS)
    with pytest.raises(GenerationError, match=r"prompt 0 holds token ids outside the vocabulary \[0, 264\)"):
        generate(ScriptedModel(), [[300]], settings, **IDS)
    with pytest.raises(GenerationError, match="no prompts"):
        generate(ScriptedModel(), [], settings, **IDS)


def test_generate_command_on_a_saved_folder(copy_model: DiffusionMoE, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    folder = save_pretrained(copy_model, tmp_path / "copy", tokenizer=byte_tokenizer(), flavor="debug")
    args = [str(folder), "--prompt", "12hgfedcba=", "--prompt", "abcabcab=", "--gen-length", "24",
            "--block-length", "8", "--threshold", "0.9", "--json"]
    assert main(["generate", *args]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["answers"] == ["hgfedcba", "abcabcab"]
    assert report["forward_passes"] <= 6

    assert main(["generate", str(folder), "--prompt", "x", "--gen-length", "10", "--block-length", "4"]) == 2
    assert "gen_length 10 is not divisible by block_length 4" in capsys.readouterr().err
    assert main(["generate", str(folder), "--prompt", "x" * 500, "--gen-length", "24", "--block-length", "8"]) == 2
    assert "prompt of 500 tokens + gen_length 24 exceeds the model's context of 512" in capsys.readouterr().err
    (folder / "tokenizer.json").unlink()
    assert main(["generate", *args]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err
