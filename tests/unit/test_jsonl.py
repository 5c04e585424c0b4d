"""JSON Lines as every reader takes them: blank lines skipped, a bad line named ``file:line`` — in the tokenize
job's corpus reader as in the quick check's."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.jsonl import jsonl_records
from data_pipeline.tokenize import _documents
from dlmoe.errors import DataError


def test_records_carry_their_line_and_blank_lines_are_skipped() -> None:
    text = '{"text": "a"}\n\n  \n[1, 2]\n"plain"\n'
    assert list(jsonl_records(text, "c.jsonl")) == [("c.jsonl:1", {"text": "a"}), ("c.jsonl:4", [1, 2]),
                                                    ("c.jsonl:5", "plain")]


def test_a_line_that_is_not_json_is_named() -> None:
    records = jsonl_records('{"text": "a"}\n{"text": \n', "c.jsonl")
    assert next(records) == ("c.jsonl:1", {"text": "a"})
    with pytest.raises(DataError, match=r"c\.jsonl:2: not valid JSON \(Expecting value at column 10\)"):
        next(records)


@pytest.mark.parametrize(("line", "message"), [
    ('{"text": ', r"corpus\.jsonl:2: not valid JSON"),
    ('{"body": "x"}', r"corpus\.jsonl:2: no string field 'text' \(--text-field\)"),
])
def test_the_corpus_reader_names_the_bad_line(line: str, message: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(f'{{"text": "fine"}}\n{line}\n')
    spec = {"endpoint_url": None, "fmt": "jsonl", "text_field": "text", "sft": False}
    documents = _documents(str(corpus), spec)
    assert next(documents) == "fine"
    with pytest.raises(DataError, match=message):
        next(documents)
