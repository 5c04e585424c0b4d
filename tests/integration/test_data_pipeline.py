"""The data pipeline against a real S3 endpoint (moto server) and real Ray: tokenize to s3://, verify, stream from
s3:// with the W=1/W=2 and resume equalities, and every failure named."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import storage
from data_pipeline.shards import HELDOUT_FOLDER, decode_shard, read_manifest, table_arrays
from data_pipeline.stream import TokenStream, epoch_windows, window_permutation
from data_pipeline.tokenize import TokenizeSpec, held_out, run_tokenize
from data_pipeline.tokenizers import byte_tokenizer
from dlmoe.cli import main
from dlmoe.config import load_job_config
from dlmoe.errors import ConfigError, DataError
from dlmoe.train.driver import run_training

pytestmark = pytest.mark.usefixtures("ray_local")
SEQ_LEN = 64
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real corpus: 12 standard-library sources (about 250 KB), one of them longer than many rows."""
    folder = tmp_path_factory.mktemp("corpus")
    for name in ("abc.py", "bisect.py", "colorsys.py", "copy.py", "fnmatch.py", "glob.py", "heapq.py",
                 "keyword.py", "numbers.py", "operator.py", "shlex.py", "textwrap.py"):
        shutil.copy(STDLIB / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def s3_dataset(corpus: Path, make_bucket: Callable[[str], str]) -> str:
    make_bucket("dlmoe-corpus")
    uri = "s3://dlmoe-corpus/tokenized"
    assert main(["tokenize", "--input", str(corpus), "--output", uri, "--seq-len", str(SEQ_LEN), "--format", "text",
                 "--unit-mb", "0.05", "--no-progress"]) == 0
    return uri


def test_tokenize_packs_every_token_deterministically(corpus: Path, s3_dataset: str, tmp_path: Path) -> None:
    manifest = read_manifest(s3_dataset)
    tokenizer = byte_tokenizer()
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    expected = sum(len(tokenizer.encode(t)) + 1 for t in texts)
    assert manifest.tokens == expected + manifest.stats["eos_padding_tokens"]
    assert manifest.stats["documents"] == 12 and len(manifest.shards) > 3
    assert manifest.tokenizer["fingerprint"] == tokenizer.fingerprint and manifest.tokenizer["mask_id"] == 258
    # Every token is kept: the token counts of the shards are those of the documents plus EOS separators/padding.
    folder = storage.resolve(s3_dataset)
    rows = [table_arrays(decode_shard(storage.read_bytes(folder.child(i.path)), i, manifest, i.path), SEQ_LEN)[0]
            for i in manifest.shards]
    counts = np.bincount(np.concatenate(rows).reshape(-1), minlength=259)
    joined = np.frombuffer(b"".join(t.encode() for t in texts), dtype=np.uint8)
    assert np.array_equal(counts[:256], np.bincount(joined, minlength=256))
    assert counts[256] == len(texts) + manifest.stats["eos_padding_tokens"]
    # Same input, another output (local this time): byte-identical shards.
    again = run_tokenize(TokenizeSpec(output=str(tmp_path / "again"), seq_len=SEQ_LEN, inputs=[str(corpus)],
                                      unit_bytes=int(0.05 * 2**20)), progress=False)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in manifest.shards]
    # In one unit, the rows read in order are the documents separated by EOS, long ones split across rows.
    whole = run_tokenize(TokenizeSpec(output=str(tmp_path / "one"), seq_len=SEQ_LEN, inputs=[str(corpus)]),
                         progress=False)
    local = storage.resolve(str(tmp_path / "one"))
    stream = np.concatenate([table_arrays(decode_shard(storage.read_bytes(local.child(i.path)), i, whole, i.path),
                                          SEQ_LEN)[0] for i in whole.shards]).reshape(-1)[:expected]
    assert bytes(np.where(stream == 256, 0, stream).astype(np.uint8)) == b"".join(t.encode() + b"\x00" for t in texts)


def test_s3_commands_exit_cleanly_on_busy_cores(s3_dataset: str) -> None:
    """`dlmoe data verify s3://…` used to abort at exit (SIGABRT from the AWS SDK's threads) in about 1 run of 10
    on busy cores: 12 runs, two at a time, each must exit 0 with its result."""
    command = [sys.executable, "-m", "dlmoe.cli", "data", "verify", s3_dataset]
    for _ in range(6):
        pair = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
        for proc in pair:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"exit {proc.returncode}: {err[-500:]}"
            assert "shards verified" in out and "terminate called" not in err


def test_verify_passes_then_names_a_corrupted_shard(s3_dataset: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "verify", s3_dataset]) == 0
    assert "all" in capsys.readouterr().out
    manifest = read_manifest(s3_dataset)
    source, copy = storage.resolve(s3_dataset), storage.resolve("s3://dlmoe-corpus/corrupted")
    for name in [i.path for i in manifest.shards] + ["manifest.json"]:
        data = bytearray(storage.read_bytes(source.child(name)))
        if name == manifest.shards[2].path:
            data[len(data) // 3] ^= 0x01
        storage.write_bytes(copy.child(name), bytes(data))
    assert main(["data", "verify", copy.uri]) == 1
    err = capsys.readouterr().err
    assert f"s3://dlmoe-corpus/corrupted/{manifest.shards[2].path} is corrupt" in err
    assert "1 of" in err
    with pytest.raises(DataError, match=f"{manifest.shards[2].path} is corrupt"):
        list(TokenStream(copy.uri, global_batch_size=8, seed=0, window_shards=len(manifest.shards), max_batches=1))


def test_data_info(s3_dataset: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "info", s3_dataset, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seq_len"] == SEQ_LEN and report["rows"] * SEQ_LEN == report["tokens"]
    assert report["tokenizer"]["name"] == "bytes"


def _batches(uri: str, **kwargs: object) -> list[dict]:
    return list(TokenStream(uri, global_batch_size=8, seed=11, window_shards=2, **kwargs))  # type: ignore[arg-type]


def test_stream_w2_union_and_resume_equal_the_w1_run(s3_dataset: str) -> None:
    manifest = read_manifest(s3_dataset)
    per_epoch = manifest.rows // 8
    full = _batches(s3_dataset, max_batches=per_epoch + 3)
    assert [b["epoch"] for b in full[per_epoch - 1:per_epoch + 1]] == [0, 1]  # epochs roll over
    r0 = _batches(s3_dataset, rank=0, world_size=2, max_batches=per_epoch + 3)
    r1 = _batches(s3_dataset, rank=1, world_size=2, max_batches=per_epoch + 3)
    for whole, a, b in zip(full, r0, r1, strict=True):
        assert np.array_equal(whole["input_ids"], np.concatenate([a["input_ids"], b["input_ids"]]))
        assert np.array_equal(whole["sample_index"], np.concatenate([a["sample_index"], b["sample_index"]]))
    resumed = _batches(s3_dataset, start_sample=5 * 8, max_batches=per_epoch - 5 + 3)
    for whole, again in zip(full[5:], resumed, strict=True):
        assert np.array_equal(whole["input_ids"], again["input_ids"]) and whole["epoch"] == again["epoch"]
    # The epoch's rows are the manifest's rows in the order the pure order functions give.
    folder = storage.resolve(s3_dataset)
    shard_rows = [table_arrays(decode_shard(storage.read_bytes(folder.child(i.path)), i, manifest, i.path),
                               SEQ_LEN)[0] for i in manifest.shards]
    order = []
    for window in epoch_windows([s.rows for s in manifest.shards], 11, 0, 2):
        rows = np.concatenate([shard_rows[s] for s in window.shards])
        order.append(rows[window_permutation(window, 11, 0)])
    expected = np.concatenate(order)[:per_epoch * 8]
    assert np.array_equal(np.concatenate([b["input_ids"] for b in full[:per_epoch]]), expected)


def test_stream_refuses_a_dataset_that_does_not_match_the_job(s3_dataset: str) -> None:
    with pytest.raises(DataError, match=f"has seq_len {SEQ_LEN}, the job expects 128"):
        TokenStream(s3_dataset, global_batch_size=8, seed=0, seq_len=128)
    with pytest.raises(DataError, match="global_batch_size 9 is not a positive multiple of world_size 2"):
        TokenStream(s3_dataset, global_batch_size=9, seed=0, world_size=2)


def test_rerun_is_idempotent_and_a_different_dataset_needs_overwrite(corpus: Path, bucket: str) -> None:
    uri = f"s3://{bucket}/d"
    spec = TokenizeSpec(output=uri, seq_len=32, inputs=[str(corpus / "abc.py")])
    first = run_tokenize(spec, progress=False)
    assert run_tokenize(spec, progress=False) == first
    with pytest.raises(DataError, match=f"{uri} already holds a different dataset .* pass --overwrite"):
        run_tokenize(TokenizeSpec(output=uri, seq_len=48, inputs=[str(corpus / "abc.py")]), progress=False)
    replaced = run_tokenize(TokenizeSpec(output=uri, seq_len=48, inputs=[str(corpus / "abc.py")], overwrite=True),
                            progress=False)
    assert read_manifest(uri).seq_len == 48 == replaced.seq_len


def test_failed_job_leaves_no_manifest(tmp_path: Path, bucket: str) -> None:
    (tmp_path / "good.txt").write_text("fine text " * 50)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    uri = f"s3://{bucket}/half"
    with pytest.raises(DataError, match=r"bad.txt is not UTF-8 text"):
        run_tokenize(TokenizeSpec(output=uri, seq_len=16, inputs=[str(tmp_path)], unit_bytes=1), progress=False)
    with pytest.raises(DataError, match=r"no manifest\.json at"):
        read_manifest(uri)


def test_input_errors(tmp_path: Path, bucket: str) -> None:
    with pytest.raises(DataError, match="input /nonexistent/corpus does not exist"):
        run_tokenize(TokenizeSpec(output=str(tmp_path / "o"), seq_len=16, inputs=["/nonexistent/corpus"]))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(DataError, match="holds no documents"):
        run_tokenize(TokenizeSpec(output=str(tmp_path / "o"), seq_len=16, inputs=[str(tmp_path / "empty")]),
                     progress=False)
    (tmp_path / "empty" / "b.txt").write_text("some text")
    with pytest.raises(DataError, match=r"s3://no-such-bucket-here/x/manifest\.json: the bucket 'no-such-bucket-here'"):
        run_tokenize(TokenizeSpec(output="s3://no-such-bucket-here/x", seq_len=16,
                                  inputs=[str(tmp_path / "empty")]), progress=False)


def test_unreachable_endpoint_fails_after_bounded_retries() -> None:
    with pytest.raises(DataError, match=r"s3://b/d/manifest.json: still failing after 4 attempts"):
        read_manifest("s3://b/d", endpoint_url="http://127.0.0.1:9")


def test_sft_rows_with_prompt_length(tmp_path: Path, bucket: str) -> None:
    lines = [{"prompt": "2+2=", "response": "4"},
             {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
             {"prompt": "x" * 40, "response": "too long for the row"}]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    uri = f"s3://{bucket}/sft"
    manifest = run_tokenize(TokenizeSpec(output=uri, seq_len=32, inputs=[str(tmp_path / "sft.jsonl")], fmt="jsonl",
                                         sft=True), progress=False)
    assert manifest.kind == "sft" and manifest.rows == 2 and manifest.stats["sft_examples_too_long"] == 1
    (batch,) = list(TokenStream(uri, global_batch_size=2, seed=0, kind="sft", max_batches=1))
    by_prompt = {int(p): row for p, row in zip(batch["prompt_len"], batch["input_ids"], strict=True)}
    assert bytes(by_prompt[4][:5].astype(np.uint8)) == b"2+2=4" and set(by_prompt[4][5:].tolist()) == {256}
    chat_prompt = "user: hi\nassistant: "
    chat_row = by_prompt[len(chat_prompt)]
    assert bytes(chat_row[:len(chat_prompt) + 5].astype(np.uint8)) == (chat_prompt + "hello").encode()


def test_training_reads_the_dataset(s3_dataset: str, tmp_path: Path) -> None:
    overrides = [f"data.uri={s3_dataset}", "data.validation=''", "train.eval_every=0", f"data.seq_len={SEQ_LEN}",
                 "train.steps=4", "train.warmup_steps=1", f"checkpoint.storage={tmp_path}", "export.enabled=false",
                 "tracking.enabled=false",
                 "parallel.num_workers=1", "parallel.ep_size=1"]
    result = run_training(load_job_config(None, overrides), progress=False)
    assert result.final_step == 4 and all(np.isfinite(result.losses))
    with pytest.raises(DataError, match=f"has seq_len {SEQ_LEN}, the job expects 32"):
        run_training(load_job_config(None, [*overrides, "data.seq_len=32", "run_name=other"]), progress=False)
    with pytest.raises(ConfigError, match="masks with id 258, the model with 259"):
        run_training(load_job_config(None, [*overrides, "model.mask_token_id=259", "run_name=other"]), progress=False)


def _ray_train_loop(config: dict) -> None:
    import ray.train

    context = ray.train.get_context()
    stream = TokenStream(config["uri"], global_batch_size=8, seed=11, rank=context.get_world_rank(),
                         world_size=context.get_world_size(), window_shards=2, max_batches=3)
    rows = [batch["input_ids"].tolist() for batch in stream]
    Path(config["out"], f"rank{context.get_world_rank()}.json").write_text(json.dumps(rows))


def test_ray_train_workers_build_their_own_streams(s3_dataset: str, tmp_path: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Two workers take both CPUs of the local Ray: the streams' read tasks must run without a CPU of their own.
    trainer = TorchTrainer(_ray_train_loop, train_loop_config={"uri": s3_dataset, "out": str(tmp_path)},
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                           run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="stream"))
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    alone = [b["input_ids"].tolist() for b in _batches(s3_dataset, max_batches=3)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == alone


def test_a_validation_fraction_carves_a_held_out_dataset_by_document(corpus: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "split"
    assert main(["tokenize", "--input", str(corpus), "--output", str(out), "--seq-len", str(SEQ_LEN),
                 "--validation-fraction", "0.5", "--unit-mb", "0.05", "--no-progress"]) == 0
    assert "data.validation=heldout" in capsys.readouterr().out
    texts = {p.name: p.read_text() for p in sorted(corpus.iterdir())}
    expected = {name for name, text in texts.items() if held_out(text, 0.5)}
    assert 0 < len(expected) < len(texts)  # the fixed corpus splits both ways at one half
    train, held = read_manifest(str(out)), read_manifest(str(out / HELDOUT_FOLDER))
    assert (train.stats["documents"], held.stats["documents"]) == (len(texts) - len(expected), len(expected))
    # Byte-level: each held-out document is its bytes plus one EOS, packed into full rows (the last one padded).
    held_tokens = sum(len(texts[name].encode()) + 1 for name in expected)
    assert held.rows == -(-held_tokens // SEQ_LEN) and held.settings_fingerprint == train.settings_fingerprint
    # Its tokens are exactly the held-out documents' bytes (plus EOS), and the training set's the others'.
    for manifest, folder, names in ((held, out / HELDOUT_FOLDER, expected), (train, out, set(texts) - expected)):
        where = storage.resolve(str(folder))
        rows = [table_arrays(decode_shard(storage.read_bytes(where.child(i.path)), i, manifest, i.path), SEQ_LEN)[0]
                for i in manifest.shards]
        counts = np.bincount(np.concatenate(rows).reshape(-1), minlength=259)
        joined = np.frombuffer(b"".join(texts[name].encode() for name in sorted(names)), dtype=np.uint8)
        assert np.array_equal(counts[:256], np.bincount(joined, minlength=256))
    with pytest.raises(DataError, match="already holds a different dataset"):
        run_tokenize(TokenizeSpec(output=str(out), seq_len=SEQ_LEN, inputs=[str(corpus)]), progress=False)
    with pytest.raises(DataError, match=r"--validation-fraction must be in \[0, 1\), got 1.0"):
        run_tokenize(TokenizeSpec(output=str(tmp_path / "bad"), seq_len=SEQ_LEN, inputs=[str(corpus)],
                                  validation_fraction=1.0), progress=False)
