"""Context-free baselines of a tokenized dataset: the held-out unigram cross-entropy.

A model that ignores its context can do no better, on held-out text, than the training set's token frequencies;
for the masked-diffusion objective its ELBO is exactly their cross-entropy (each masked position is scored with
the same distribution, and the 1/t weight undoes the masking rate on average). So the held-out unigram
cross-entropy, in nats per token, is the first number a trained model's validation loss must fall below.
"""

from __future__ import annotations

import numpy as np

from data_pipeline import storage
from data_pipeline.shards import decode_shard, read_manifest, table_arrays
from dlmoe.errors import DataError

# Add-one-half (Jeffreys) smoothing: a token the training set never holds costs a finite amount.
DEFAULT_SMOOTHING = 0.5


def token_counts(uri: str, *, vocab_size: int | None = None, endpoint_url: str | None = None) -> np.ndarray:
    """How often each token id occurs in the dataset at ``uri`` (every shard read and checked against its
    manifest): an int64 array of ``vocab_size`` entries (default: the manifest tokenizer's vocabulary size)."""
    manifest = read_manifest(uri, endpoint_url=endpoint_url)
    size = vocab_size if vocab_size is not None else manifest.tokenizer.get("vocab_size")
    if not isinstance(size, int) or size <= 0:
        raise DataError(f"the manifest of {uri} gives no tokenizer vocab_size; pass vocab_size")
    folder = storage.resolve(uri, endpoint_url=endpoint_url)
    counts = np.zeros(size, dtype=np.int64)
    for info in manifest.shards:
        loc = folder.child(info.path)
        ids, _ = table_arrays(decode_shard(storage.read_bytes(loc), info, manifest, loc.uri), manifest.seq_len)
        counts += _bincount(ids, size, loc.uri)
    return counts


def _bincount(ids: np.ndarray, vocab_size: int, where: str) -> np.ndarray:
    flat = np.asarray(ids).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise DataError(f"{where} holds token ids outside [0, {vocab_size}) (min {flat.min()}, max {flat.max()})")
    return np.bincount(flat, minlength=vocab_size).astype(np.int64)


def unigram_cross_entropy(train_ids: np.ndarray, heldout_ids: np.ndarray, *, vocab_size: int,
                          smoothing: float = DEFAULT_SMOOTHING) -> float:
    """The cross-entropy, in nats per token, of the (smoothed) token frequencies of ``train_ids`` on
    ``heldout_ids`` (arrays of token ids of any shape)."""
    return cross_entropy_of_counts(_bincount(train_ids, vocab_size, "the training ids"),
                                   _bincount(heldout_ids, vocab_size, "the held-out ids"), smoothing=smoothing)


def cross_entropy_of_counts(train_counts: np.ndarray, heldout_counts: np.ndarray, *,
                            smoothing: float = DEFAULT_SMOOTHING) -> float:
    """``-Σ_v h_v log q_v / Σ_v h_v`` with ``q`` the training counts plus ``smoothing``, normalised, and ``h`` the
    held-out counts (nats per held-out token)."""
    if train_counts.shape != heldout_counts.shape:
        raise ValueError(f"count vectors differ in size: {train_counts.shape} and {heldout_counts.shape}")
    if smoothing < 0:
        raise ValueError(f"smoothing must be non-negative, got {smoothing}")
    total = heldout_counts.sum()
    if total == 0:
        raise DataError("the held-out set holds no tokens")
    q = train_counts.astype(np.float64) + smoothing
    if q.sum() == 0:
        raise DataError("the training set holds no tokens")
    seen = heldout_counts > 0
    if np.any(q[seen] == 0):
        raise DataError("a held-out token never occurs in the training set; use smoothing > 0")
    log_q = np.log(q[seen]) - np.log(q.sum())
    return float(-(heldout_counts[seen] * log_q).sum() / total)


def heldout_unigram_cross_entropy(train_uri: str, heldout_uri: str, *, endpoint_url: str | None = None,
                                  smoothing: float = DEFAULT_SMOOTHING) -> float:
    """The held-out unigram cross-entropy (nats/token): the token frequencies of the tokenized dataset at
    ``train_uri`` scored on the one at ``heldout_uri`` (e.g. ``data.uri`` and ``data.validation_uri``). Reads both
    datasets once."""
    train_vocab = read_manifest(train_uri, endpoint_url=endpoint_url).tokenizer.get("vocab_size")
    heldout_vocab = read_manifest(heldout_uri, endpoint_url=endpoint_url).tokenizer.get("vocab_size")
    if train_vocab != heldout_vocab:
        raise DataError(f"{train_uri} and {heldout_uri} were tokenized with vocabularies of {train_vocab} and "
                        f"{heldout_vocab} tokens")
    return cross_entropy_of_counts(token_counts(train_uri, endpoint_url=endpoint_url),
                                   token_counts(heldout_uri, endpoint_url=endpoint_url), smoothing=smoothing)
