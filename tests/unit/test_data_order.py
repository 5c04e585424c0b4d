"""The stream's order maths, without Ray: an epoch's order is a permutation that depends on (rows, seed, epoch)
only; rank slices of a W=2 run rebuild the W=1 batches; a resume at k is the tail of the full run."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.stream import _window_of, epoch_windows, rank_range, window_permutation

SHARD_ROWS = [7, 3, 12, 5, 9, 1, 8]


def epoch_order(seed: int, epoch: int, window_shards: int) -> list[tuple[int, int]]:
    """(shard, row) of every sample of the epoch, composed from the stream's own functions."""
    order = []
    for window in epoch_windows(SHARD_ROWS, seed, epoch, window_shards):
        sources = [(s, r) for s in window.shards for r in range(SHARD_ROWS[s])]
        order.extend(sources[i] for i in window_permutation(window, seed, epoch))
    return order


def run(seed: int, gbs: int, rank: int, world: int, start: int = 0, window_shards: int = 2) -> list[list[tuple]]:
    order = epoch_order(seed, 0, window_shards)
    batches = []
    for b in range(len(order) // gbs):
        lo, hi = rank_range(b, gbs, rank, world)
        lo = max(lo, start)
        if lo < hi:
            batches.append(order[lo:hi])
    return batches


@pytest.mark.parametrize("window_shards", [1, 2, 3, 7])
def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch(window_shards: int) -> None:
    order = epoch_order(5, 0, window_shards)
    everything = [(s, r) for s, n in enumerate(SHARD_ROWS) for r in range(n)]
    assert sorted(order) == everything
    assert epoch_order(5, 0, window_shards) == order
    assert epoch_order(5, 1, window_shards) != order
    assert epoch_order(6, 0, window_shards) != order


def test_windows_cover_the_epoch_contiguously() -> None:
    windows = epoch_windows(SHARD_ROWS, 1, 0, 3)
    assert sorted(s for w in windows for s in w.shards) == list(range(len(SHARD_ROWS)))
    assert [w.start for w in windows] == list(np.cumsum([0] + [w.rows for w in windows[:-1]]))
    for sample in range(sum(SHARD_ROWS)):
        w = _window_of(windows, sample)
        assert w.start <= sample < w.start + w.rows


def test_union_over_ranks_of_w2_equals_w1() -> None:
    w1 = run(3, 8, 0, 1)
    r0, r1 = run(3, 8, 0, 2), run(3, 8, 1, 2)
    assert len(w1) == len(r0) == len(r1) == sum(SHARD_ROWS) // 8
    assert [a + b for a, b in zip(r0, r1, strict=True)] == w1


@pytest.mark.parametrize("start", [0, 8, 13, 24, 40])
def test_resume_at_k_is_the_tail_of_the_full_run(start: int) -> None:
    full = [row for batch in run(3, 8, 0, 1) for row in batch]
    resumed = [row for batch in run(3, 8, 0, 1, start=start) for row in batch]
    assert resumed == full[start:]


def test_rank_range_splits_a_global_batch_evenly() -> None:
    assert [rank_range(2, 12, r, 3) for r in range(3)] == [(24, 28), (28, 32), (32, 36)]
