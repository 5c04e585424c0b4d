"""Reading and checking checkpoint files: the restricted reader of DeepSpeed's per-expert files against
``torch.load``, and the checksum lists (xxHash3, and the bare sha256 of older lists)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from dlmoe.checkpointing import checksum_matches, file_checksum, folder_checksums
from dlmoe.errors import CheckpointError
from dlmoe.export.checkpoint import read_tensor_dict


def test_a_flat_dict_of_tensors_reads_as_torch_load_reads_it(tmp_path: Path) -> None:
    base = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    saved = {"w1": base, "w2": base[:, 1:4], "w3": base.t(), "half": torch.randn(4, 3).to(torch.bfloat16),
             "scalar": torch.tensor(2.5)}
    torch.save(saved, tmp_path / "expert.pt")
    read = read_tensor_dict(tmp_path / "expert.pt")
    expected = torch.load(tmp_path / "expert.pt")
    assert list(read) == list(expected)
    for name, tensor in expected.items():
        assert read[name].dtype == tensor.dtype and read[name].stride() == tensor.stride(), name
        assert torch.equal(read[name], tensor), name
    assert read["w2"].data_ptr() == read["w1"].data_ptr() + 4  # views of one storage stay views of it


def test_other_content_is_read_by_torch_load(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2), "step": 3, "nested": {"x": torch.zeros(1)}}, tmp_path / "other.pt")
    read = read_tensor_dict(tmp_path / "other.pt")
    assert read["step"] == 3 and torch.equal(read["nested"]["x"], torch.zeros(1))


def test_checksums_are_xxh3_and_catch_a_changed_byte(tmp_path: Path) -> None:
    (tmp_path / "dlmoe").mkdir()
    (tmp_path / "dlmoe" / "a.pt").write_bytes(b"weights" * 1000)
    (tmp_path / "empty").write_bytes(b"")
    sums = folder_checksums(tmp_path)
    assert sorted(sums) == ["dlmoe/a.pt", "empty"]
    assert all(digest.startswith("xxh3_128:") and len(digest) == len("xxh3_128:") + 32 for digest in sums.values())
    assert all(checksum_matches(tmp_path / name, digest) for name, digest in sums.items())
    (tmp_path / "dlmoe" / "a.pt").write_bytes(b"weights" * 999 + b"weightz")
    assert not checksum_matches(tmp_path / "dlmoe" / "a.pt", sums["dlmoe/a.pt"])
    assert not checksum_matches(tmp_path / "gone.pt", sums["empty"])


def test_lists_written_with_bare_sha256_still_verify(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    path.write_bytes(b"an older checkpoint")
    old = hashlib.sha256(b"an older checkpoint").hexdigest()
    assert checksum_matches(path, old) and file_checksum(path, "sha256") == f"sha256:{old}"
    assert not checksum_matches(path, hashlib.sha256(b"something else").hexdigest())


def test_an_unknown_checksum_algorithm_is_named(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"x\.pt is recorded as md5, which this dlmoe does not know"):
        checksum_matches(path, "md5:" + "0" * 32)
