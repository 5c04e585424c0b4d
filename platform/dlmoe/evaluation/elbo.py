"""The held-out ELBO of a tokenized dataset (``dlmoe eval --tasks elbo:URI``): the masked-diffusion bound on the
negative log-likelihood of every row, in nats and bits per token and bits per byte of the text.

For a row x of L tokens, ``-log p(x) ≤ -E_l E_{M,|M|=l} [(L / l) Σ_{i∈M} log p(x_i | x with M masked)]`` (LLaDA's
likelihood form; ``dlmoe.diffusion.continuation_log_likelihood`` with an empty prompt). Each row gets
``samples`` Monte-Carlo draws, the number of masked tokens stratified over 1 … L, from a generator seeded by
(seed, the row's index): the noise is fixed — the same model gives the same value every time, on any batch size —
and two seeds differ only by the Monte-Carlo error, which ``samples`` makes small. Every token of a row counts,
EOS separators included; the bytes are those of the text the tokens decode to (special tokens count no bytes), so
bits per byte compares models across tokenizers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from tokenizers import decoders

from data_pipeline.shards import read_rows
from data_pipeline.tokenizers import Tokenizer
from dlmoe.diffusion.likelihood import LikelihoodSettings, continuation_log_likelihood
from dlmoe.diffusion.noise import mix_seed
from dlmoe.errors import DataError
from dlmoe.evaluation.loading import LoadedModel

TASK_PREFIX = "elbo:"
# A stream of its own for the per-row Monte-Carlo seeds.
_STREAM_ELBO = 4


@dataclass(frozen=True)
class ElboResult:
    """The bound over ``rows`` rows: totals and per-token / per-byte rates; ``stderr_bits_per_token`` is the
    standard error of the mean over rows (the text's spread and the Monte-Carlo error together)."""

    rows: int
    tokens: int
    bytes: int
    samples: int
    nats_per_token: float
    bits_per_token: float
    bits_per_byte: float
    stderr_bits_per_token: float

    def metrics(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """How many bytes of text each token id stands for: 0 for special tokens; for byte-level vocabularies (the
    built-in one, GPT-2-style BPE) the number of byte symbols of the token, exactly; otherwise the UTF-8 length of
    the token decoded alone."""
    backend = tokenizer.backend
    special = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
    byte_level = isinstance(backend.decoder, decoders.ByteLevel)
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for token_id in range(tokenizer.vocab_size):
        token = backend.id_to_token(token_id)
        if token_id in special or token is None:
            continue
        lengths[token_id] = len(token) if byte_level else len(tokenizer.decode([token_id]).encode("utf-8"))
    return lengths


def rows_elbo(loaded: LoadedModel, rows: np.ndarray, *, samples: int = 64, batch_size: int = 32,
              seed: int = 0) -> ElboResult:
    """The ELBO of ``rows`` [N, L] (token ids) under the loaded model, ``samples`` draws per row."""
    if rows.ndim != 2 or not rows.size:
        raise DataError(f"the held-out set holds no rows to score (got shape {rows.shape})")
    if rows.shape[1] > loaded.max_positions:
        raise DataError(f"held-out rows of {rows.shape[1]} tokens exceed the model's max_position_embeddings "
                        f"{loaded.max_positions}")
    lengths = token_byte_lengths(loaded.tokenizer)
    nats = []
    for index, row in enumerate(rows.tolist()):
        settings = LikelihoodSettings(samples=samples, batch_size=batch_size,
                                      seed=mix_seed(_STREAM_ELBO, seed, index))
        nats.append(-continuation_log_likelihood(loaded.model, [], row, mask_id=loaded.mask_id, settings=settings))
    per_row = np.asarray(nats) / rows.shape[1] / math.log(2.0)
    tokens = int(rows.size)
    text_bytes = int(lengths[rows].sum())
    total_nats = float(np.sum(nats))
    stderr = float(per_row.std(ddof=1) / math.sqrt(len(per_row))) if len(per_row) > 1 else math.nan
    return ElboResult(rows=len(rows), tokens=tokens, bytes=text_bytes, samples=samples,
                      nats_per_token=total_nats / tokens, bits_per_token=total_nats / tokens / math.log(2.0),
                      bits_per_byte=total_nats / math.log(2.0) / text_bytes if text_bytes else math.nan,
                      stderr_bits_per_token=stderr)


def dataset_elbo(loaded: LoadedModel, uri: str, *, limit: int | None = None, samples: int = 64,
                 batch_size: int = 32, seed: int = 0) -> ElboResult:
    """The ELBO of the first ``limit`` rows (all when None) of the tokenized dataset at ``uri``, which must have been
    tokenized with the model's tokenizer."""
    manifest, rows = read_rows(uri, limit=limit)
    if manifest.kind != "pretrain":
        raise DataError(f"dataset {uri} is {manifest.kind} data; the held-out ELBO scores pretraining text")
    if manifest.tokenizer.get("fingerprint") != loaded.tokenizer.fingerprint:
        raise DataError(f"dataset {uri} was tokenized with {manifest.tokenizer.get('name')}, not the tokenizer of "
                        f"{loaded.folder} ({loaded.tokenizer.name}): its ids would mean other text")
    return rows_elbo(loaded, rows.astype(np.int64), samples=samples, batch_size=batch_size, seed=seed)
