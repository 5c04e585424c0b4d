"""``dlmoe eval --tasks elbo:URI``: the held-out ELBO in nats and bits per token and bits per byte — exact for a model
that ignores its context, fixed noise, two seeds within 1 % on a model trained on a small synthetic language, and
the CLI end to end on a tokenized dataset."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import storage
from data_pipeline.baselines import unigram_cross_entropy
from data_pipeline.shards import Manifest, shard_name, write_manifest, write_shard
from data_pipeline.tokenizers import byte_tokenizer
from dlmoe.cli import main
from dlmoe.diffusion import GenerationSettings, MaskedDiffusionObjective, ObjectiveSettings
from dlmoe.errors import DataError
from dlmoe.evaluation import load_for_eval
from dlmoe.evaluation.elbo import rows_elbo, token_byte_lengths
from dlmoe.evaluation.runner import EvalRequest, EvaluationError, check_tasks
from dlmoe.export import save_pretrained
from dlmoe.model import DiffusionMoE, build_model, get_flavor
from dlmoe.model.config import BYTE_EOS_ID, BYTE_MASK_ID

from .test_golden import synthetic_corpus

TRAIN_STEPS, BATCH = 150, 16


def held_out_rows(count: int, seed: int) -> np.ndarray:
    """Rows of the synthetic language with an EOS in the middle of each (a token that is no text)."""
    rows = synthetic_corpus(count, seed=seed + 100).numpy()
    rows[:, rows.shape[1] // 2] = BYTE_EOS_ID
    return rows


def write_dataset(folder: Path, rows: np.ndarray, fingerprint: str) -> str:
    loc = storage.resolve(str(folder))
    info = write_shard(loc, shard_name(0), rows.astype(np.int32))
    tokenizer = {"name": "bytes", "fingerprint": fingerprint, "vocab_size": 259, "eos_id": 256, "pad_id": 257,
                 "mask_id": 258}
    write_manifest(loc, Manifest(kind="pretrain", seq_len=rows.shape[1], tokenizer=tokenizer, shards=[info],
                                 source=["synthetic"]))
    return str(folder)


@contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The debug model after 150 steps of the pretraining objective on the synthetic language (a few seconds: on one
    thread, which such small products run fastest on)."""
    with one_thread():
        model = _train_on_synthetic_text()
    return save_pretrained(model, tmp_path_factory.mktemp("elbo") / "trained", tokenizer=byte_tokenizer(),
                           flavor="debug", step=TRAIN_STEPS)


def _train_on_synthetic_text() -> DiffusionMoE:
    model = build_model(get_flavor("debug"), seed=0)
    rows = synthetic_corpus(TRAIN_STEPS * BATCH, seed=1)
    objective = MaskedDiffusionObjective(ObjectiveSettings(mask_token_id=BYTE_MASK_ID, seed=0,
                                                           global_batch_size=BATCH, stratified_t=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(TRAIN_STEPS):
        index = torch.arange(step * BATCH, (step + 1) * BATCH)
        out = objective(model, rows[index], index, epoch=0)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model.eval()


def test_byte_lengths_of_the_byte_tokenizer() -> None:
    lengths = token_byte_lengths(byte_tokenizer())
    assert lengths.tolist() == [1] * 256 + [0, 0, 0]


def test_a_model_that_ignores_its_context_scores_exactly_the_log_of_the_vocabulary(tmp_path: Path) -> None:
    model = build_model(get_flavor("debug"), seed=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform logits over the vocabulary, whatever the input
    loaded = load_for_eval(save_pretrained(model, tmp_path / "flat", tokenizer=byte_tokenizer(), flavor="debug"))
    rows = held_out_rows(8, seed=1)
    result = rows_elbo(loaded, rows, samples=4, batch_size=3)
    vocab = model.config.vocab_size
    assert result.nats_per_token == pytest.approx(math.log(vocab), rel=1e-6)
    assert result.bits_per_token == pytest.approx(math.log2(vocab), rel=1e-6)
    # Bytes are the text's: the EOS padding counts as tokens, not bytes.
    text_bytes = int((rows < 256).sum())
    assert result.tokens == rows.size and result.bytes == text_bytes < rows.size
    assert result.bits_per_byte == pytest.approx(math.log2(vocab) * rows.size / text_bytes, rel=1e-6)


def test_fixed_noise_and_two_seeds_agree_to_one_percent(trained_folder: Path) -> None:
    loaded = load_for_eval(trained_folder)
    rows = synthetic_corpus(64, seed=2).numpy()
    with one_thread():
        first = rows_elbo(loaded, rows, seed=0)  # the defaults of dlmoe eval: 64 draws per row
        second = rows_elbo(loaded, rows, seed=1)
    assert second != first
    assert second.bits_per_byte == pytest.approx(first.bits_per_byte, rel=0.01)  # measured: 0.07 %
    assert first.bits_per_byte == first.bits_per_token  # no special tokens in these rows
    # The same noise on any batch size (to the float rounding of other matrix shapes).
    assert rows_elbo(loaded, rows[:8], seed=0, batch_size=7).bits_per_byte == pytest.approx(
        rows_elbo(loaded, rows[:8], seed=0).bits_per_byte, rel=1e-7)
    # The model learned something: below the training text's unigram cross-entropy.
    unigram = unigram_cross_entropy(synthetic_corpus(TRAIN_STEPS * BATCH, seed=1).numpy(), rows, vocab_size=264)
    assert first.bits_per_token < unigram / math.log(2)


def test_dlmoe_eval_reports_the_held_out_elbo(trained_folder: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    rows = held_out_rows(16, seed=7)
    dataset = write_dataset(tmp_path / "held", rows, byte_tokenizer().fingerprint)
    out = tmp_path / "results.json"
    assert main(["eval", str(trained_folder), "--tasks", f"elbo:{dataset}", "--mc-samples", "16", "--limit", "12",
                 "--output-json", str(out), "--no-progress"]) == 0
    document = json.loads(out.read_text())
    metrics = document["tasks"]["elbo"]
    assert document["elbo"]["dataset"] == dataset
    assert metrics["rows"] == 12 and metrics["tokens"] == 12 * rows.shape[1] and metrics["samples"] == 16
    assert metrics["bits_per_token"] == pytest.approx(metrics["nats_per_token"] / math.log(2))
    assert metrics["bytes"] == 12 * (rows.shape[1] - 1)  # the EOS of each row is a token and no text
    assert metrics["bits_per_byte"] > metrics["bits_per_token"]
    printed = capsys.readouterr().out
    assert "bits_per_byte" in printed and "bits_per_token" in printed


def test_datasets_that_cannot_be_scored_are_refused(trained_folder: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    request = EvalRequest(tasks=["elbo:"], generation=GenerationSettings())
    with pytest.raises(EvaluationError, match="names no dataset"):
        check_tasks(request)
    with pytest.raises(EvaluationError, match="one held-out dataset per evaluation"):
        check_tasks(EvalRequest(tasks=["elbo:a", "elbo:b"], generation=GenerationSettings()))
    with pytest.raises(DataError, match=r"no manifest\.json"):
        check_tasks(EvalRequest(tasks=[f"elbo:{tmp_path / 'nothing'}"], generation=GenerationSettings()))
    other = write_dataset(tmp_path / "other", held_out_rows(4, seed=3), "0" * 64)
    assert main(["eval", str(trained_folder), "--tasks", f"elbo:{other}", "--no-progress"]) == 2
    assert f"dataset {other} was tokenized with bytes, not the tokenizer of" in capsys.readouterr().err
