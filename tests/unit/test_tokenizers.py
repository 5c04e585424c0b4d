"""Tokenizers: the built-in byte-level vocabulary (ids = bytes, then the specials the small flavors use), saving
and loading ``tokenizer.json``, the fingerprint, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline.tokenizers import byte_tokenizer, load_tokenizer
from dlmoe.errors import DataError
from dlmoe.model.config import BYTE_EOS_ID, BYTE_MASK_ID, BYTE_PAD_ID, BYTE_VOCAB_SIZE

TEXT = "héllo, wörld\n\tdef f(x): return x ** 2  # ✓ 🙂"


def test_byte_ids_are_the_utf8_bytes_and_specials_match_the_model() -> None:
    tok = byte_tokenizer()
    assert tok.encode(TEXT) == list(TEXT.encode())
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert (tok.special.eos, tok.special.pad, tok.special.mask) == (BYTE_EOS_ID, BYTE_PAD_ID, BYTE_MASK_ID)
    assert tok.vocab_size == 259 <= BYTE_VOCAB_SIZE
    ids = [*tok.encode("ab"), BYTE_EOS_ID, BYTE_MASK_ID]
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special_tokens=False) == "ab<|eos|><|mask|>"
    assert tok.encode_batch(["a", "bc"]) == [[97], [98, 99]]


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    tok = byte_tokenizer()
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["mask_token"] == "<|mask|>" and config["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = load_tokenizer(tmp_path)
    assert loaded.special == tok.special
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.encode(TEXT) == tok.encode(TEXT)
    # Explicit ids win over tokenizer_config.json, and change the fingerprint.
    explicit = load_tokenizer(tmp_path / "tokenizer.json", eos_id=10, mask_id=BYTE_MASK_ID)
    assert explicit.special.eos == 10 and explicit.special.pad == BYTE_PAD_ID
    assert explicit.fingerprint != tok.fingerprint


def test_errors_name_the_file_and_the_special(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no tokenizer: .*/missing does not exist"):
        load_tokenizer(tmp_path / "missing")
    byte_tokenizer().save(tmp_path)
    with pytest.raises(DataError, match="mask id 999 is not in its vocabulary of 259 tokens"):
        load_tokenizer(tmp_path, mask_id=999)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eos|>", "mask_token": "<|mask|>"}))
    assert load_tokenizer(tmp_path).special.pad == BYTE_EOS_ID  # no pad token: pad with EOS (LLaDA convention)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eos|>"}))
    assert load_tokenizer(tmp_path).special.mask == BYTE_MASK_ID  # found by its well-known name
    (tmp_path / "tokenizer_config.json").unlink()
    tokenizer_json = tmp_path / "tokenizer.json"
    tokenizer_json.write_text(tokenizer_json.read_text().replace("<|mask|>", "<|hole|>"))
    with pytest.raises(DataError, match="the mask id is unknown"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"mask_token": "<|hole|>"}))
    assert load_tokenizer(tmp_path).special.mask == BYTE_MASK_ID
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>", "mask_token": "<|hole|>"}))
    with pytest.raises(DataError, match=r"eos_token.*token '<nope>' is not in the vocabulary"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path)
