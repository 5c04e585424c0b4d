"""The shard format and its manifest (DESIGN.md §3).

A dataset is a folder (local or S3) of parquet shards plus ``manifest.json``. Each shard has a column
``input_ids`` (fixed-size list of int32, length ``seq_len``), for SFT data ``prompt_len`` (int32) and, for packed
pretraining data since format version 2, ``doc_ids`` (fixed-size list of int32: each position's document within its
row, 0 for the first, counting up at every boundary), which document-level attention reads. Shards are
written with parquet page checksums and listed in the manifest with their rows, bytes and sha256, so a reader can
prove a shard is the one that was written. The manifest is written last: a dataset without one is incomplete and
is never read.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import storage
from data_pipeline.storage import Location
from dlmoe.errors import DataError

FORMAT_VERSION = 2
# Version 1 datasets (no doc_ids) are still read: their rows count as one document each (whole-row attention).
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
# The held-out set `dlmoe tokenize --validation-fraction` carves: a dataset of its own inside the training one.
HELDOUT_FOLDER = "validation"
KINDS = ("pretrain", "sft")


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest lists it (``path`` relative to the dataset folder)."""

    path: str
    rows: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """What a dataset holds and how it was made; readers check it against the job."""

    kind: str
    seq_len: int
    tokenizer: dict[str, Any]
    shards: list[ShardInfo]
    source: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    settings_fingerprint: str = ""
    format_version: int = FORMAT_VERSION
    doc_ids: bool = False  # whether the shards record document boundaries (format version 2 and later)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len

    @property
    def attention_note(self) -> str:
        """What ``objective.document_attention`` does with this dataset, for ``dlmoe data info``."""
        if self.doc_ids:
            return "document boundaries recorded (doc_ids): objective.document_attention keeps documents apart"
        if self.kind == "sft":
            return "one example per row: attention covers the whole row"
        return (f"no document boundaries recorded (format version {self.format_version}): "
                f"objective.document_attention attends whole rows (tokenize again with --overwrite to record them)")

    def to_json(self) -> str:
        data = asdict(self)
        data["rows"], data["tokens"] = self.rows, self.tokens
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, uri: str) -> Manifest:
        try:
            data = json.loads(text)
            version = data.get("format_version")
            if version not in READABLE_VERSIONS:
                raise DataError(f"{uri}: format_version {version!r} is not one of the supported "
                                f"{', '.join(map(str, READABLE_VERSIONS))}")
            shards = [ShardInfo(path=str(s["path"]), rows=int(s["rows"]), bytes=int(s["bytes"]),
                                sha256=str(s["sha256"])) for s in data["shards"]]
            manifest = cls(kind=str(data["kind"]), seq_len=int(data["seq_len"]), tokenizer=dict(data["tokenizer"]),
                           shards=shards, source=list(data.get("source", [])), stats=dict(data.get("stats", {})),
                           settings_fingerprint=str(data.get("settings_fingerprint", "")), format_version=version,
                           doc_ids=bool(data.get("doc_ids", False)))
        except DataError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{uri} is not a valid manifest: {type(exc).__name__}: {exc}") from exc
        if manifest.kind not in KINDS or manifest.seq_len <= 0:
            raise DataError(f"{uri}: kind must be one of {KINDS} and seq_len positive, got {manifest.kind!r}, "
                            f"{manifest.seq_len}")
        return manifest


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


def _fixed_lists(values: np.ndarray, seq_len: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values, dtype=np.int32).reshape(-1), type=pa.int32())
    return pa.FixedSizeListArray.from_arrays(flat, seq_len)


def encode_shard(input_ids: np.ndarray, prompt_len: np.ndarray | None = None,
                 doc_ids: np.ndarray | None = None) -> bytes:
    """Parquet bytes of rows ``input_ids`` [N, seq_len] (and ``prompt_len`` [N] for SFT, ``doc_ids`` [N, seq_len]
    for packed pretraining rows), with page checksums."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [rows, seq_len], got shape {input_ids.shape}")
    rows, seq_len = input_ids.shape
    columns = {"input_ids": _fixed_lists(input_ids, seq_len)}
    if prompt_len is not None:
        columns["prompt_len"] = pa.array(np.asarray(prompt_len, dtype=np.int32), type=pa.int32())
    if doc_ids is not None:
        if doc_ids.shape != input_ids.shape:
            raise ValueError(f"doc_ids shape {doc_ids.shape} differs from input_ids shape {input_ids.shape}")
        columns["doc_ids"] = _fixed_lists(doc_ids, seq_len)
    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink, compression="zstd", write_page_checksum=True,
                   row_group_size=max(1, min(rows, 8192)))
    return sink.getvalue()


def write_shard(folder: Location, name: str, input_ids: np.ndarray, prompt_len: np.ndarray | None = None,
                doc_ids: np.ndarray | None = None) -> ShardInfo:
    data = encode_shard(input_ids, prompt_len, doc_ids)
    storage.write_bytes(folder.child(name), data)
    return ShardInfo(path=name, rows=int(input_ids.shape[0]), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def decode_shard(data: bytes, info: ShardInfo, manifest: Manifest, uri: str) -> pa.Table:
    """Check ``data`` against the manifest (size, sha256, rows, schema) and decode it; ``DataError`` names ``uri``."""
    if len(data) != info.bytes:
        raise DataError(f"shard {uri} has {len(data)} bytes, the manifest says {info.bytes} (truncated or replaced)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.sha256:
        raise DataError(f"shard {uri} is corrupt: sha256 {digest[:16]}… differs from the manifest's "
                        f"{info.sha256[:16]}…")
    try:
        table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
    except Exception as exc:
        raise DataError(f"shard {uri} cannot be decoded: {exc}") from exc
    expected = pa.list_(pa.int32(), manifest.seq_len)
    if table.num_rows != info.rows or table.schema.field("input_ids").type != expected:
        raise DataError(f"shard {uri} holds {table.num_rows} rows of {table.schema.field('input_ids').type}, the "
                        f"manifest says {info.rows} rows of {expected}")
    if manifest.kind == "sft" and "prompt_len" not in table.column_names:
        raise DataError(f"shard {uri} of an SFT dataset has no prompt_len column")
    if manifest.doc_ids and ("doc_ids" not in table.column_names
                             or table.schema.field("doc_ids").type != expected):
        raise DataError(f"shard {uri} has no doc_ids column of {expected}, which its manifest promises")
    return table


def table_arrays(table: pa.Table, seq_len: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``input_ids`` [N, seq_len] int32 and ``prompt_len`` [N] (or None) of a decoded shard."""
    ids = table.column("input_ids").combine_chunks()
    input_ids = ids.values.to_numpy(zero_copy_only=False).reshape(-1, seq_len)
    prompt_len = table.column("prompt_len").to_numpy() if "prompt_len" in table.column_names else None
    return input_ids, prompt_len


def table_doc_ids(table: pa.Table, seq_len: int) -> np.ndarray | None:
    """``doc_ids`` [N, seq_len] int32 of a decoded shard, or None when it records no document boundaries."""
    if "doc_ids" not in table.column_names:
        return None
    values: np.ndarray = table.column("doc_ids").combine_chunks().values.to_numpy(zero_copy_only=False)
    return values.reshape(-1, seq_len)


def row_doc_ids(doc_stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Per-row document ids [N, seq_len] from a stream of global document numbers (non-decreasing) cut into rows:
    each row counts from 0, its first position's document (often one that began in an earlier row)."""
    rows = np.asarray(doc_stream, dtype=np.int64).reshape(-1, seq_len)
    return (rows - rows[:, :1]).astype(np.int32)


def read_rows(uri: str, *, limit: int | None = None, endpoint_url: str | None = None
              ) -> tuple[Manifest, np.ndarray]:
    """The manifest and the first ``limit`` rows (all when None) of the dataset at ``uri``, shards in manifest
    order, each checked against the manifest: ``input_ids`` [rows, seq_len] int32."""
    manifest = read_manifest(uri, endpoint_url=endpoint_url)
    folder = storage.resolve(uri, endpoint_url=endpoint_url)
    parts: list[np.ndarray] = []
    taken = 0
    for info in manifest.shards:
        if limit is not None and taken >= limit:
            break
        loc = folder.child(info.path)
        ids, _ = table_arrays(decode_shard(storage.read_bytes(loc), info, manifest, loc.uri), manifest.seq_len)
        parts.append(ids if limit is None else ids[:limit - taken])
        taken += len(parts[-1])
    rows = np.concatenate(parts) if parts else np.zeros((0, manifest.seq_len), dtype=np.int32)
    return manifest, rows


def read_manifest(uri: str, *, endpoint_url: str | None = None) -> Manifest:
    """The manifest of the dataset at ``uri``; a folder without one is not (yet) a dataset."""
    loc = storage.resolve(uri, endpoint_url=endpoint_url).child(MANIFEST_FILE)
    if not storage.exists(loc):
        raise DataError(f"no {MANIFEST_FILE} at {uri}: not a dataset, or a tokenize job that did not finish")
    return Manifest.from_json(storage.read_bytes(loc).decode(), loc.uri)


def write_manifest(folder: Location, manifest: Manifest) -> None:
    storage.write_bytes(folder.child(MANIFEST_FILE), manifest.to_json().encode())


def check_against_job(manifest: Manifest, uri: str, *, seq_len: int | None = None,
                      tokenizer_fingerprint: str | None = None, kind: str | None = None) -> None:
    """Refuse a dataset whose seq_len, tokenizer or kind differs from what the job expects."""
    if seq_len is not None and manifest.seq_len != seq_len:
        raise DataError(f"dataset {uri} has seq_len {manifest.seq_len}, the job expects {seq_len} (data.seq_len)")
    if tokenizer_fingerprint is not None and manifest.tokenizer.get("fingerprint") != tokenizer_fingerprint:
        raise DataError(f"dataset {uri} was tokenized with {manifest.tokenizer.get('name')} (fingerprint "
                        f"{str(manifest.tokenizer.get('fingerprint'))[:12]}…), not the job's tokenizer "
                        f"(fingerprint {tokenizer_fingerprint[:12]}…)")
    if kind is not None and manifest.kind != kind:
        raise DataError(f"dataset {uri} is {manifest.kind} data, the job's objective needs {kind} data")


def size_problems(manifest: Manifest, uri: str, *, endpoint_url: str | None = None) -> list[str]:
    """The shards of the dataset at ``uri`` that are missing or whose size is not the manifest's, from one listing
    of the folder (no shard is read: ``verify`` checks contents). Cheap enough for every launch."""
    folder = storage.resolve(uri, endpoint_url=endpoint_url)
    sizes = {loc.path: size for loc, size in storage.list_files(folder, (".parquet",))}
    problems = []
    for info in manifest.shards:
        loc = folder.child(info.path)
        size = sizes.get(loc.path)
        if size is None:
            problems.append(f"shard {loc.uri} is missing")
        elif size != info.bytes:
            problems.append(f"shard {loc.uri} has {size} bytes, the manifest says {info.bytes} (truncated or "
                            f"replaced)")
    return problems


def check_sizes(manifest: Manifest, uri: str, *, endpoint_url: str | None = None) -> None:
    """``DataError`` naming the shards of ``size_problems``, when there are any."""
    problems = size_problems(manifest, uri, endpoint_url=endpoint_url)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DataError(f"dataset {uri}: {'; '.join(problems[:3])}{more}; dlmoe data verify {uri} checks every "
                        f"shard")


def verify(uri: str, *, endpoint_url: str | None = None) -> tuple[Manifest, list[str]]:
    """Check every shard of the dataset (existence, size, sha256, rows); returns the manifest and the problems."""
    manifest = read_manifest(uri, endpoint_url=endpoint_url)
    folder = storage.resolve(uri, endpoint_url=endpoint_url)
    problems = []
    for info in manifest.shards:
        loc = folder.child(info.path)
        try:
            if not storage.exists(loc):
                problems.append(f"shard {loc.uri} is missing")
                continue
            decode_shard(storage.read_bytes(loc), info, manifest, loc.uri)
        except DataError as exc:
            problems.append(str(exc))
    return manifest, problems
