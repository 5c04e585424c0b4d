"""Document-level attention (LLaDA 2.0): document boundaries in the shards, the attention pattern and positions,
and a packed row computing each document as it would be alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import storage
from data_pipeline.shards import Manifest, decode_shard, read_manifest, table_doc_ids
from data_pipeline.tokenize import TokenizeSpec, _assemble, _pack
from data_pipeline.tokenizers import byte_tokenizer
from dlmoe.diffusion import MaskedDiffusionObjective, ObjectiveSettings
from dlmoe.diffusion.blocks import document_pattern, document_positions
from dlmoe.model import build_model, get_flavor


def _packed(tmp_path: Path, documents: list[str], seq_len: int) -> Manifest:
    """Pack ``documents`` as one tokenize unit does, then the leftovers as the driver does."""
    tokenizer = byte_tokenizer()
    folder = storage.resolve(str(tmp_path))
    info, _, tail, tail_docs = _pack(0, documents, tokenizer, folder, {"sft": False, "seq_len": seq_len})
    row = {"documents": len(documents), "skipped": 0, "shard": json.dumps(None if info is None else info.__dict__),
           "tail": tail.tobytes(), "tail_docs": tail_docs.tobytes()}
    manifest = _assemble(folder, [row], spec=TokenizeSpec(output=str(tmp_path), seq_len=seq_len),
                         tokenizer=tokenizer, files=[("x", 1)], fingerprint="f", units=1)
    assert manifest is not None
    return manifest


def _rows(tmp_path: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    ids, docs = [], []
    for info in manifest.shards:
        table = decode_shard((tmp_path / info.path).read_bytes(), info, manifest, info.path)
        ids.append(np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)))
        found = table_doc_ids(table, manifest.seq_len)
        assert found is not None
        docs.append(found)
    return np.concatenate(ids), np.concatenate(docs)


def test_tokenize_records_document_boundaries(tmp_path: Path) -> None:
    # byte tokens + EOS (256): "ab" E | "cde" E | "f" E -> rows [a b E c] [d e E f], leftover [E] + 3 EOS of padding
    manifest = _packed(tmp_path, ["ab", "cde", "f"], seq_len=4)
    ids, docs = _rows(tmp_path, manifest)
    assert ids.tolist() == [[97, 98, 256, 99], [100, 101, 256, 102], [256, 256, 256, 256]]
    # each row counts from its first position's document; the padding is one more document
    assert docs.tolist() == [[0, 0, 0, 1], [0, 0, 0, 1], [0, 1, 1, 1]]
    loaded = read_manifest(str(tmp_path))
    assert loaded.format_version == 2 and loaded.doc_ids
    assert "document boundaries recorded" in loaded.attention_note


def test_version_1_datasets_still_read_as_whole_rows(tmp_path: Path) -> None:
    manifest = _packed(tmp_path, ["ab", "cde"], seq_len=4)
    data = json.loads((tmp_path / "manifest.json").read_text())
    del data["doc_ids"]
    data["format_version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    old = read_manifest(str(tmp_path))
    assert old.format_version == 1 and not old.doc_ids and old.rows == manifest.rows
    assert "no document boundaries recorded (format version 1)" in old.attention_note


def test_pattern_and_positions() -> None:
    docs = torch.tensor([[0, 0, 1, 1, 1, 2]])
    assert document_positions(docs).tolist() == [[0, 1, 0, 1, 2, 0]]
    pattern = document_pattern(docs)[0, 0]
    assert pattern.shape == (6, 6)
    assert pattern[2].tolist() == [False, False, True, True, True, False]
    assert torch.equal(pattern, pattern.T)


def test_packed_row_of_two_documents_equals_each_alone() -> None:
    torch.manual_seed(0)
    model = build_model(get_flavor("debug")).eval()
    first, second = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 9))
    docs = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        packed = model(torch.cat([first, second], 1), attention_pattern=document_pattern(docs),
                       position_ids=document_positions(docs)).logits
        alone = torch.cat([model(first).logits, model(second).logits], 1)
        whole_row = model(torch.cat([first, second], 1)).logits
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(whole_row, alone, atol=1e-3)  # without the pattern the documents see each other


def test_objective_document_attention_is_an_option_and_off_by_default() -> None:
    torch.manual_seed(0)
    model = build_model(get_flavor("debug"))
    x0 = torch.randint(0, 256, (2, 16))
    docs = torch.tensor([[0] * 5 + [1] * 11, [0] * 16])
    settings = ObjectiveSettings(mask_token_id=258, seed=0, global_batch_size=2, variable_length_prob=0.0)
    plain = MaskedDiffusionObjective(settings)(model, x0, torch.arange(2), 0, doc_ids_BL=docs)
    settings.document_attention = True
    split = MaskedDiffusionObjective(settings)(model, x0, torch.arange(2), 0, doc_ids_BL=docs)
    assert plain.loss.item() != pytest.approx(split.loss.item(), abs=1e-6)
    with pytest.warns(UserWarning, match="no document boundaries"):
        whole = MaskedDiffusionObjective(settings)(model, x0, torch.arange(2), 0)
    assert whole.loss.item() == pytest.approx(plain.loss.item(), abs=1e-6)
