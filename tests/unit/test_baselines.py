"""The held-out unigram cross-entropy: hand values, smoothing, and the counts of a tokenized dataset on disk."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import storage
from data_pipeline.baselines import (
    cross_entropy_of_counts,
    heldout_unigram_cross_entropy,
    token_counts,
    unigram_cross_entropy,
)
from data_pipeline.shards import Manifest, shard_name, write_manifest, write_shard
from dlmoe.errors import DataError

TOKENIZER = {"name": "bytes", "fingerprint": "f" * 64, "vocab_size": 259, "eos_id": 256, "pad_id": 257,
             "mask_id": 258}


def write_dataset(folder: Path, rows: list[np.ndarray], seq_len: int = 4) -> str:
    loc = storage.resolve(str(folder))
    infos = [write_shard(loc, shard_name(i), np.asarray(r, dtype=np.int32).reshape(-1, seq_len))
             for i, r in enumerate(rows)]
    write_manifest(loc, Manifest(kind="pretrain", seq_len=seq_len, tokenizer=TOKENIZER, shards=infos, source=["x"]))
    return str(folder)


def test_hand_value_without_smoothing() -> None:
    # Training frequencies 3/4 and 1/4; held out: one of each.
    train = np.array([0, 0, 0, 1])
    held = np.array([[0, 1]])
    expected = -(math.log(0.75) + math.log(0.25)) / 2
    assert unigram_cross_entropy(train, held, vocab_size=2, smoothing=0.0) == pytest.approx(expected)


def test_smoothing_gives_unseen_tokens_a_finite_cost() -> None:
    train, held = np.array([0, 0, 1, 1]), np.array([2])
    # (0 + 0.5) / (4 + 3 * 0.5)
    assert unigram_cross_entropy(train, held, vocab_size=3) == pytest.approx(-math.log(0.5 / 5.5))
    with pytest.raises(DataError, match="never occurs in the training set"):
        unigram_cross_entropy(train, held, vocab_size=3, smoothing=0.0)


def test_the_training_distribution_scores_its_own_entropy_best() -> None:
    rng = np.random.default_rng(0)
    probs = np.array([0.5, 0.25, 0.125, 0.125])
    train = rng.choice(4, size=200_000, p=probs)
    held = rng.choice(4, size=200_000, p=probs)
    entropy = -(probs * np.log(probs)).sum()
    assert unigram_cross_entropy(train, held, vocab_size=4) == pytest.approx(entropy, abs=2e-3)
    uniform = rng.choice(4, size=200_000)
    assert unigram_cross_entropy(uniform, held, vocab_size=4) == pytest.approx(math.log(4), abs=2e-3)


def test_ids_outside_the_vocabulary_and_empty_sets_are_refused() -> None:
    with pytest.raises(DataError, match=r"outside \[0, 4\)"):
        unigram_cross_entropy(np.array([0, 7]), np.array([0]), vocab_size=4)
    with pytest.raises(DataError, match="held-out set holds no tokens"):
        cross_entropy_of_counts(np.ones(4, dtype=np.int64), np.zeros(4, dtype=np.int64))


def test_held_out_cross_entropy_of_datasets_on_disk(tmp_path: Path) -> None:
    # Two training shards: id 65 five times, 66 once, EOS (256) twice.
    train = write_dataset(tmp_path / "train", [np.array([65, 65, 65, 66]), np.array([65, 65, 256, 256])])
    held = write_dataset(tmp_path / "train" / "validation", [np.array([65, 66, 256, 65])])
    counts = token_counts(train)
    assert counts.shape == (259,) and counts[65] == 5 and counts[66] == 1 and counts[256] == 2 and counts.sum() == 8
    q = (counts + 0.5) / (8 + 0.5 * 259)
    expected = -(2 * math.log(q[65]) + math.log(q[66]) + math.log(q[256])) / 4
    assert heldout_unigram_cross_entropy(train, held) == pytest.approx(expected)
