"""Shards and manifests on a local folder, and storage URIs: encode/decode, every check a reader makes, verify,
job compatibility, URI resolution and bounded retries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from data_pipeline import storage
from data_pipeline.shards import (
    Manifest,
    ShardInfo,
    check_against_job,
    decode_shard,
    read_manifest,
    shard_name,
    table_arrays,
    verify,
    write_manifest,
    write_shard,
)
from dlmoe.errors import DataError

TOKENIZER = {"name": "bytes", "fingerprint": "f" * 64, "vocab_size": 259, "eos_id": 256, "pad_id": 257,
             "mask_id": 258}


def make_dataset(folder: Path, kind: str = "pretrain", shards: int = 3, seq_len: int = 16) -> Manifest:
    loc = storage.resolve(str(folder))
    infos = []
    for i in range(shards):
        ids = np.arange(i * 100, i * 100 + 5 * seq_len, dtype=np.int32).reshape(5, seq_len) % 259
        prompt_len = np.full(5, 3, dtype=np.int32) if kind == "sft" else None
        infos.append(write_shard(loc, shard_name(i), ids, prompt_len))
    manifest = Manifest(kind=kind, seq_len=seq_len, tokenizer=TOKENIZER, shards=infos, source=["x"])
    write_manifest(loc, manifest)
    return manifest


def test_round_trip_and_manifest(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path, kind="sft")
    loaded = read_manifest(str(tmp_path))
    assert loaded == manifest and loaded.rows == 15 and loaded.tokens == 15 * 16
    info = manifest.shards[1]
    table = decode_shard((tmp_path / info.path).read_bytes(), info, manifest, "s")
    ids, prompt_len = table_arrays(table, 16)
    assert ids.dtype == np.int32 and ids.shape == (5, 16) and ids[0, 0] == 100
    assert prompt_len is not None and prompt_len.tolist() == [3] * 5
    assert json.loads((tmp_path / "manifest.json").read_text())["tokens"] == 240


def test_reader_checks_size_sha_and_schema(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path)
    info = manifest.shards[0]
    data = (tmp_path / info.path).read_bytes()
    with pytest.raises(DataError, match="has 99 bytes, the manifest says"):
        decode_shard(data[:99], info, manifest, "s3://b/shard-000000.parquet")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    with pytest.raises(DataError, match=r"shard s3://b/x is corrupt: sha256"):
        decode_shard(bytes(flipped), info, manifest, "s3://b/x")
    wrong_rows = ShardInfo(info.path, 6, info.bytes, info.sha256)
    with pytest.raises(DataError, match=r"holds 5 rows .* the manifest says 6 rows"):
        decode_shard(data, wrong_rows, manifest, "s")


def test_verify_names_every_bad_shard(tmp_path: Path) -> None:
    make_dataset(tmp_path, shards=4)
    assert verify(str(tmp_path))[1] == []
    (tmp_path / shard_name(1)).unlink()
    corrupt = tmp_path / shard_name(3)
    data = bytearray(corrupt.read_bytes())
    data[40] ^= 1
    corrupt.write_bytes(bytes(data))
    _, problems = verify(str(tmp_path))
    assert len(problems) == 2
    assert "shard-000001.parquet is missing" in problems[0]
    assert "shard-000003.parquet is corrupt" in problems[1]


def test_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no manifest\.json at .*: not a dataset, or a tokenize job that did not"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"format_version": 1, "kind": "pretrain"}')
    with pytest.raises(DataError, match="is not a valid manifest: KeyError"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"format_version": 7}')
    with pytest.raises(DataError, match="format_version 7 is not one of the supported 1, 2"):
        read_manifest(str(tmp_path))


def test_job_compatibility(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path)
    check_against_job(manifest, "d", seq_len=16, tokenizer_fingerprint="f" * 64, kind="pretrain")
    with pytest.raises(DataError, match="has seq_len 16, the job expects 32"):
        check_against_job(manifest, "d", seq_len=32)
    with pytest.raises(DataError, match=r"tokenized with bytes .* not the job's tokenizer"):
        check_against_job(manifest, "d", tokenizer_fingerprint="0" * 64)
    with pytest.raises(DataError, match="is pretrain data, the job's objective needs sft data"):
        check_against_job(manifest, "d", kind="sft")


def test_resolve_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = storage.resolve(str(tmp_path / "a"))
    assert isinstance(local.fs, pafs.LocalFileSystem) and local.path == str(tmp_path / "a")
    assert storage.resolve(f"file://{tmp_path}").path == str(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    s3 = storage.resolve("s3://bucket/some/prefix/")
    assert isinstance(s3.fs, pafs.S3FileSystem) and s3.path == "bucket/some/prefix"
    assert s3.child("m.json").uri == "s3://bucket/some/prefix/m.json"
    assert storage.s3_endpoint() == "http://127.0.0.1:1"
    assert storage.s3_endpoint("http://x:9") == "http://x:9"
    for bad, message in (("gs://b/x", "unsupported URI scheme"), ("s3://", "malformed S3 URI"), ("", "empty")):
        with pytest.raises(DataError, match=message):
            storage.resolve(bad)


def test_retrying_is_bounded_and_names_the_uri() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("Connection refused")
        return "done"

    assert storage.retrying(flaky, uri="s3://b/k", what="read", base_delay=0.0) == "done"
    assert len(calls) == 3

    def down() -> None:
        raise OSError("curlCode: 7, Couldn't connect to server (connection refused)")

    with pytest.raises(DataError, match=r"cannot read s3://b/k: still failing after 4 attempts"):
        storage.retrying(down, uri="s3://b/k", what="read", base_delay=0.0)

    permanent: list[int] = []

    def missing_bucket() -> None:
        permanent.append(1)
        raise OSError("NoSuchBucket: The specified bucket does not exist")

    with pytest.raises(DataError, match="cannot write s3://nope/x: the bucket does not exist"):
        storage.retrying(missing_bucket, uri="s3://nope/x", what="write", base_delay=0.0)
    assert len(permanent) == 1


def test_held_out_documents_are_chosen_by_their_text_alone() -> None:
    from data_pipeline.tokenize import held_out

    documents = [f"document {i}" for i in range(4000)]
    chosen = [d for d in documents if held_out(d, 0.1)]
    assert 300 < len(chosen) < 500  # a hash read as a uniform number: about a tenth
    assert chosen == [d for d in reversed(documents) if held_out(d, 0.1)][::-1]  # order does not matter
    assert set(chosen) <= {d for d in documents if held_out(d, 0.2)}  # a larger fraction holds out a superset
    assert not any(held_out(d, 0.0) for d in documents)
    assert held_out(("prompt", "answer"), 0.5) == held_out("prompt\x00answer", 0.5)  # SFT pairs: both texts


def test_an_outage_is_told_from_a_refusal_through_the_errors_that_wrap_it() -> None:
    def down() -> None:
        raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7")

    with pytest.raises(storage.StorageUnavailable) as exhausted:
        storage.retrying(down, uri="s3://b/k", what="read", base_delay=0.0)
    assert storage.is_transient(exhausted.value)

    class TaskError(Exception):  # how Ray hands back a task's exception: as ``cause``, with its text
        def __init__(self, cause: BaseException) -> None:
            super().__init__(f"task failed: {cause}")
            self.cause = cause

    assert storage.is_transient(TaskError(OSError("Connection reset by peer")))
    try:
        raise RuntimeError("reading the window") from OSError("503 Service Unavailable")
    except RuntimeError as chained:
        assert storage.is_transient(chained)
    assert not storage.is_transient(TaskError(OSError("NoSuchBucket: the bucket does not exist")))
    assert not storage.is_transient(DataError("shard s3://b/k.parquet does not match its sha256"))
    assert not storage.is_transient(FileNotFoundError("connection.json"))
