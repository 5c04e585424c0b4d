"""The training stream: deterministic, resumable, worker-count independent batches from a tokenized dataset.

**Order.** The global sample sequence of an epoch is a pure function of (manifest, seed, epoch) — DESIGN.md §3:
the shards are shuffled (seeded by (seed, epoch)), cut into windows of ``window_shards`` consecutive shards, and
the rows of each window are shuffled (seeded by (seed, epoch, window)). That is a two-level shuffle — global
across shards, full within a window — that needs only one window in memory at a time, where a full permutation of
a trillion-token corpus could not be held. Sample ``k`` of an epoch is row ``perm_w[k - start_w]`` of window
``w``, computable from the manifest's row counts alone, so a stream can start at any ``k``.

**Batches.** Global batch ``b`` of an epoch is samples ``[b·G, (b+1)·G)``; rank ``r`` of ``W`` takes
``[b·G + r·G/W, b·G + (r+1)·G/W)``. An epoch has ``N // G`` batches; the last ``N mod G`` samples of its order are
not used in that epoch (the next epoch reshuffles, so no row is systematically left out). Each yielded batch
carries the within-epoch ``sample_index`` of its rows — with the epoch, the key of the masking noise — so the
union over ranks of a ``W = 2`` run is exactly the ``W = 1`` run, and a stream started at ``start_sample = k``
yields exactly what an uninterrupted one yields from ``k`` on. Epochs roll over with a new order.

**Reading, and Ray Train.** Each window is read with Ray Data (``read_binary_files`` over the window's shards,
decoded and checked against the manifest — size, sha256, parquet page checksums — in ``map_batches``), and the
next window is read in the background while the current one is consumed: at most two windows are in memory. Every
Ray Train worker builds its own ``TokenStream`` with its rank and world size (per-worker construction) rather than
receiving a shard of a dataset through ``get_dataset_shard``: Ray Train's split hands rows to workers in whatever
order its executor produces them and cannot resume mid-epoch, while our order must be a pure function of
(seed, epoch, sample index) for the W=1/W=2 and resume equalities to hold. Every rank reads the whole window (a
``W``-fold read cost traded for no coordination between ranks).
"""

from __future__ import annotations

import concurrent.futures
import functools
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipeline import storage
from data_pipeline.ray_jobs import ensure_ray
from data_pipeline.shards import (
    Manifest,
    check_against_job,
    decode_shard,
    read_manifest,
    table_arrays,
    table_doc_ids,
)
from dlmoe.errors import DataError

DEFAULT_WINDOW_SHARDS = 4
DEFAULT_OUTAGE_S = 300.0  # how long a window read waits for storage that is unavailable before the step fails


@dataclass(frozen=True)
class Window:
    """A run of consecutive shards in an epoch's shuffled shard order, and where its samples start."""

    index: int
    shards: tuple[int, ...]
    start: int
    rows: int


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]))


def epoch_windows(shard_rows: list[int], seed: int, epoch: int, window_shards: int) -> list[Window]:
    """The windows of an epoch in order (shard order seeded by (seed, epoch))."""
    order = _rng(seed, epoch, 0).permutation(len(shard_rows)).tolist()
    windows, start = [], 0
    for w, lo in enumerate(range(0, len(order), window_shards)):
        shards = tuple(order[lo:lo + window_shards])
        rows = sum(shard_rows[s] for s in shards)
        windows.append(Window(w, shards, start, rows))
        start += rows
    return windows


def window_permutation(window: Window, seed: int, epoch: int) -> np.ndarray:
    """Order of the window's rows (indices into its shards' rows, concatenated in window order)."""
    return _rng(seed, epoch, 1, window.index).permutation(window.rows)


def rank_range(batch: int, global_batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """The within-epoch sample range ``[lo, hi)`` of rank ``rank`` in global batch ``batch``."""
    per_rank = global_batch_size // world_size
    lo = batch * global_batch_size + rank * per_rank
    return lo, lo + per_rank


def _decode_batch(batch: dict[str, np.ndarray], shards: dict[str, Any], manifest_json: str) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` step: check and decode raw shard files into rows (``shard`` = position in window).

    A shard that fails its checks comes back as one row whose ``error`` names it (raised by the reader), so the
    user sees our message rather than Ray's wrapper of it.
    """
    manifest = Manifest.from_json(manifest_json, "manifest.json")
    by_path = {info.path: info for info in manifest.shards}
    ids_out, prompt_out, position_out, docs_out = [], [], [], []
    for raw, path in zip(batch["bytes"], batch["path"], strict=True):
        name = str(path).rsplit("/", 1)[-1]
        try:
            table = decode_shard(bytes(raw), by_path[name], manifest, shards[name]["uri"])
        except DataError as exc:
            failed = {"input_ids": np.zeros((1, manifest.seq_len), dtype=np.int32),
                      "prompt_len": np.full(1, -1, dtype=np.int32), "shard": np.full(1, -1, dtype=np.int32),
                      "error": np.asarray([str(exc)])}
            if manifest.doc_ids:
                failed["doc_ids"] = failed["input_ids"]
            return failed
        input_ids, prompt_len = table_arrays(table, manifest.seq_len)
        doc_ids = table_doc_ids(table, manifest.seq_len)
        if manifest.doc_ids and doc_ids is not None:
            docs_out.append(doc_ids)
        ids_out.append(input_ids)
        prompt_out.append(prompt_len if prompt_len is not None else np.full(len(input_ids), -1, dtype=np.int32))
        position_out.append(np.full(len(input_ids), shards[name]["position"], dtype=np.int32))
    rows = sum(len(a) for a in ids_out)
    out = {"input_ids": np.concatenate(ids_out), "prompt_len": np.concatenate(prompt_out),
           "shard": np.concatenate(position_out), "error": np.full(rows, "")}
    if docs_out:
        out["doc_ids"] = np.concatenate(docs_out)
    return out


class TokenStream:
    """Iterate this rank's slice of every global batch of the dataset at ``uri``, from ``(epoch, start_sample)``.

    Yields dicts with ``input_ids`` (int64 [G/W, seq_len]), ``sample_index`` (int64 [G/W], within the epoch),
    ``epoch`` (int), for SFT data ``prompt_len`` (int64 [G/W]) and, where the shards record document boundaries,
    ``doc_ids`` (int64 [G/W, seq_len]). ``seq_len``, ``tokenizer_fingerprint`` and
    ``kind`` are checked against the manifest when given. ``max_batches`` bounds the iteration (default: endless).
    A window read is retried while the storage is unavailable, for up to ``outage_s``.
    """

    def __init__(self, uri: str, *, global_batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_sample: int = 0, epoch: int = 0, window_shards: int = DEFAULT_WINDOW_SHARDS,
                 seq_len: int | None = None, tokenizer_fingerprint: str | None = None, kind: str | None = None,
                 endpoint_url: str | None = None, max_batches: int | None = None,
                 outage_s: float = DEFAULT_OUTAGE_S) -> None:
        if world_size <= 0 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if global_batch_size <= 0 or global_batch_size % world_size:
            raise DataError(f"global_batch_size {global_batch_size} is not a positive multiple of world_size "
                            f"{world_size}")
        if window_shards <= 0:
            raise DataError(f"window_shards must be positive, got {window_shards}")
        self.uri = uri
        self.endpoint_url = endpoint_url
        self.manifest = read_manifest(uri, endpoint_url=endpoint_url)
        check_against_job(self.manifest, uri, seq_len=seq_len, tokenizer_fingerprint=tokenizer_fingerprint,
                          kind=kind)
        self.global_batch_size = global_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.window_shards = window_shards
        self.batches_per_epoch = self.manifest.rows // global_batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f"dataset {uri} has {self.manifest.rows} rows, fewer than one global batch of "
                            f"{global_batch_size}")
        if not 0 <= start_sample <= self.batches_per_epoch * global_batch_size or epoch < 0:
            raise DataError(f"start_sample {start_sample} / epoch {epoch} is outside the epoch of "
                            f"{self.batches_per_epoch * global_batch_size} samples")
        self.start_sample, self.epoch = start_sample, epoch
        self.max_batches = max_batches
        self.outage_s = outage_s
        self._shard_rows = [s.rows for s in self.manifest.shards]
        # Ray must be initialised from this thread: windows are read from a background thread.
        ensure_ray()

    def _read_window(self, epoch: int, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """All rows of ``window`` in its shuffled order: (input_ids [R, L], prompt_len [R], doc_ids [R, L] or
        None). A read that fails
        because the storage is unavailable (an S3 endpoint restarting, a network cut) is done again, whole, for up
        to ``outage_s``: the window's rows and order do not depend on when it is read, so no sample is repeated or
        skipped."""
        deadline = time.monotonic() + self.outage_s
        delay = 0.5
        while True:
            try:
                return self._read_window_once(epoch, window)
            except Exception as exc:
                if not storage.is_transient(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise DataError(f"window {window.index} of {self.uri}: the storage stayed unavailable for "
                                    f"{self.outage_s:.0f} s ({str(exc).strip().splitlines()[0][:300]})") from exc
                warnings.warn(f"reading window {window.index} of {self.uri} failed, the storage looks unavailable "
                              f"({str(exc).strip().splitlines()[0][:200]}); reading it again in {delay:.1f} s "
                              f"(for up to {self.outage_s:.0f} s)", stacklevel=2)
                time.sleep(delay)
                delay = min(2 * delay, 10.0)

    def _read_window_once(self, epoch: int, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        import ray.data

        folder = storage.resolve(self.uri, endpoint_url=self.endpoint_url)
        infos = [self.manifest.shards[s] for s in window.shards]
        locations = [folder.child(info.path) for info in infos]
        for loc in locations:
            if not storage.exists(loc):
                raise DataError(f"shard {loc.uri} is missing (listed in the manifest)")
        shards = {info.path: {"uri": loc.uri, "position": i} for i, (info, loc) in enumerate(zip(infos, locations,
                                                                                                  strict=True))}
        # The read and decode tasks ask for no CPU: they run inside the training worker's budget, and a Ray Train
        # worker that holds every CPU of its node must still be able to read its data.
        dataset = ray.data.read_binary_files([loc.path for loc in locations], filesystem=folder.fs,
                                             include_paths=True, override_num_blocks=len(locations),
                                             num_cpus=0)
        decode = functools.partial(_decode_batch, shards=shards, manifest_json=self.manifest.to_json())
        dataset = dataset.map_batches(decode, batch_size=1, batch_format="numpy", num_cpus=0)
        parts = []
        for block in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            if block["error"][0]:
                raise DataError(str(block["error"][0]))
            parts.append((int(block["shard"][0]), block["input_ids"], block["prompt_len"], block.get("doc_ids")))
        parts.sort(key=lambda p: p[0])
        input_ids = np.concatenate([p[1] for p in parts])
        prompt_len = np.concatenate([p[2] for p in parts])
        doc_ids = np.concatenate([p[3] for p in parts]) if self.manifest.doc_ids else None
        if len(input_ids) != window.rows:
            raise DataError(f"window {window.index} of {self.uri} read {len(input_ids)} rows, the manifest says "
                            f"{window.rows}")
        order = window_permutation(window, self.seed, epoch)
        return input_ids[order], prompt_len[order], None if doc_ids is None else doc_ids[order]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, sample = self.epoch, self.start_sample
        emitted = 0
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            while self.max_batches is None or emitted < self.max_batches:
                usable = self.batches_per_epoch * self.global_batch_size
                if sample >= usable:
                    epoch, sample = epoch + 1, 0
                windows = epoch_windows(self._shard_rows, self.seed, epoch, self.window_shards)
                for batch in self._epoch_batches(pool, epoch, sample, windows):
                    yield batch
                    emitted += 1
                    if self.max_batches is not None and emitted >= self.max_batches:
                        return
                sample = usable

    def _epoch_batches(self, pool: concurrent.futures.ThreadPoolExecutor, epoch: int, start: int,
                       windows: list[Window]) -> Iterator[dict[str, Any]]:
        """This rank's batches of ``epoch`` from sample ``start``, reading windows one ahead."""
        usable = self.batches_per_epoch * self.global_batch_size
        first_batch = start // self.global_batch_size
        pending: dict[int, concurrent.futures.Future[tuple[np.ndarray, np.ndarray, np.ndarray | None]]] = {}

        def window_rows(index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
            if index not in pending:
                pending[index] = pool.submit(self._read_window, epoch, windows[index])
            if index + 1 < len(windows) and index + 1 not in pending and windows[index + 1].start < usable:
                pending[index + 1] = pool.submit(self._read_window, epoch, windows[index + 1])
            for stale in [k for k in pending if k < index]:
                del pending[stale]
            return pending[index].result()

        for batch in range(first_batch, self.batches_per_epoch):
            lo, hi = rank_range(batch, self.global_batch_size, self.rank, self.world_size)
            lo = max(lo, start)
            if lo >= hi:
                continue
            ids, prompts, docs, index = [], [], [], np.arange(lo, hi, dtype=np.int64)
            position = lo
            while position < hi:
                w = _window_of(windows, position)
                rows_ids, rows_prompt, rows_docs = window_rows(w.index)
                end = min(hi, w.start + w.rows)
                ids.append(rows_ids[position - w.start:end - w.start])
                prompts.append(rows_prompt[position - w.start:end - w.start])
                if rows_docs is not None:
                    docs.append(rows_docs[position - w.start:end - w.start])
                position = end
            out: dict[str, Any] = {"input_ids": np.concatenate(ids).astype(np.int64), "sample_index": index,
                                   "epoch": epoch}
            if self.manifest.kind == "sft":
                out["prompt_len"] = np.concatenate(prompts).astype(np.int64)
            if docs:
                out["doc_ids"] = np.concatenate(docs).astype(np.int64)
            yield out


def _window_of(windows: list[Window], sample: int) -> Window:
    lo, hi = 0, len(windows) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if windows[mid].start <= sample:
            lo = mid
        else:
            hi = mid - 1
    return windows[lo]
