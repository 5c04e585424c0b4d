"""Bad data that only a Ray job meets (the rest of the bad inputs are in tests/unit/test_bad_inputs.py): a binary
file, a jsonl field that is not there, a corrupt parquet input, a training dataset made with another tokenizer, one
with a truncated shard (refused at launch) and one with a corrupt shard (met by the worker, not retried). Each exits
2 naming the file, the field, the shard or the dataset, with no traceback; one child process runs them all, so Ray
starts once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from data_pipeline.shards import shard_name
from data_pipeline.tokenizers import byte_tokenizer
from dlmoe.tracking import ERROR_TAG
from tests.cli_batch import Outcome, run_batch
from tests.unit.test_bad_inputs import USAGE, Case, write_dataset

RAY_GROUPS: dict[str, dict[str, Case]] = {
    "data": {
        "tokenize-binary-file": Case("tokenize --input {ws}/binary --output {ws}/out-a --seq-len 16 --no-progress",
                                     ("blob.txt", "not UTF-8")),
        "tokenize-jsonl-text-field": Case("tokenize --input {ws}/docs.jsonl --format jsonl --text-field body "
                                          "--output {ws}/out-b --seq-len 16 --no-progress",
                                          ("docs.jsonl:1", "'body'", "--text-field")),
        "tokenize-corrupt-parquet": Case("tokenize --input {ws}/bad.parquet --format parquet --output {ws}/out-c "
                                         "--seq-len 16 --no-progress", ("bad.parquet",)),
        "train-mismatched-tokenizer": Case("train data.uri={ws}/dataset train.steps=2 tracking.enabled=false "
                                           "checkpoint.storage={ws}/runs --no-progress",
                                           ("dataset", "tokenized with")),
        # checked at launch (the shards' sizes against the manifest), before Ray Train starts
        "train-truncated-shard": Case("train data.uri={ws}/truncated train.steps=2 tracking.enabled=false "
                                      "checkpoint.storage={ws}/runs --no-progress",
                                      (f"truncated/{shard_name(1)} has 100 bytes, the manifest says", "data verify")),
        # met by the worker reading it (same size, other bytes): not retried, and the MLflow run ends FAILED
        "train-corrupt-shard": Case("train data.uri={ws}/garbled data.validation='' train.eval_every=0 train.steps=2 "
                                    "train.max_failures=2 data.global_batch_size=4 data.micro_batch_size=4 "
                                    "parallel.num_workers=1 parallel.ep_size=1 export.enabled=false "
                                    "run_name=garbled tracking.uri=sqlite:///{ws}/mlflow.db "
                                    "checkpoint.storage={ws}/runs --no-progress",
                                    ("run 'garbled' stopped: rank 0: shard ", "garbled/shard-", "is corrupt",
                                     "not retried")),
    },
}
RAY_CASES = {name: case for group in RAY_GROUPS.values() for name, case in group.items()}


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Outcome], Path]:
    ws = tmp_path_factory.mktemp("bad-data")
    (ws / "binary").mkdir()
    (ws / "binary" / "blob.txt").write_bytes(bytes(range(256)) * 8)
    (ws / "docs.jsonl").write_text(json.dumps({"text": "a document"}) + "\n")
    (ws / "bad.parquet").write_bytes(b"PAR1 this is no parquet file PAR1")
    write_dataset(ws / "dataset", fingerprint="0" * 64, seq_len=128)  # the debug job's seq_len
    for name in ("truncated", "garbled"):
        write_dataset(ws / name, fingerprint=byte_tokenizer().fingerprint, seq_len=128)
    (ws / "truncated" / shard_name(1)).write_bytes(b"PAR1" + bytes(96))
    for shard in (ws / "garbled").glob("shard-*.parquet"):
        shard.write_bytes(b"PAR1" + bytes(shard.stat().st_size - 4))
    cases = {name: case.argv.format(ws=ws).split() for name, case in RAY_CASES.items()}
    outcomes, child_stderr = run_batch(cases, cwd=ws, timeout=600)
    assert "Traceback" not in child_stderr, child_stderr[-3000:]
    return outcomes, ws


@pytest.mark.parametrize("name", sorted(RAY_CASES))
def test_bad_data_exits_naming_the_file_or_dataset(name: str, batch: tuple[dict[str, Outcome], Path]) -> None:
    case, outcome = RAY_CASES[name], batch[0][name]
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert outcome.code == USAGE and "dlmoe: error: " in outcome.stderr, outcome.stderr
    for needle in case.names:
        assert needle in outcome.stderr, outcome.stderr
    assert not list(batch[1].glob("out-*/manifest.json"))  # a refused tokenize leaves no dataset


def test_the_mlflow_run_of_a_run_stopped_by_a_corrupt_shard_ends_failed_saying_why(
        batch: tuple[dict[str, Outcome], Path]) -> None:
    client = MlflowClient(tracking_uri=f"sqlite:///{batch[1]}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("dlmoe").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags[ERROR_TAG] in batch[0]["train-corrupt-shard"].stderr
    assert "is corrupt" in run.data.tags[ERROR_TAG]
