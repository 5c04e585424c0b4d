"""Bad data that only a Ray job meets (the rest of the bad inputs are in tests/unit/test_bad_inputs.py): a binary
file, a jsonl field that is not there, a corrupt parquet input, and a training dataset made with another tokenizer.
Each exits 2 naming the file, the field or the dataset, with no traceback; one child process runs them all, so Ray
starts once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
