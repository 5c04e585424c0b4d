"""Reading, writing and checking checkpoint files: the restricted reader of DeepSpeed's per-expert files against
``torch.load``, the checksum lists (xxHash3, and the bare sha256 of older lists), and a checkpoint's write, whose
state file is published last and only when every rank's files are in storage."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from data_pipeline import storage
from dlmoe.checkpointing import (
    STATE_FILE,
    CheckpointState,
    checksum_matches,
    file_checksum,
    folder_checksums,
    folder_name,
    verify_folder,
    write,
)
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


class Engine:
    def save_checkpoint(self, folder: str, tag: str) -> None:
        (Path(folder) / tag).mkdir()
        (Path(folder) / tag / "weights.pt").write_bytes(b"weights")


def test_a_checkpoint_is_written_whole_with_its_state_file(tmp_path: Path) -> None:
    target = storage.resolve(str(tmp_path / "run")).child(folder_name(7))
    assert target.path.endswith(target.uri.rsplit("/", 1)[1]) and "checkpoint_step00000007_" in target.uri
    errors = write(Engine(), CheckpointState(step=7, shape={"parallel.num_workers": 1}), 0, target, lambda v: [v])
    folder = Path(target.path)
    assert errors == [""] and CheckpointState.from_json((folder / STATE_FILE).read_text(), "state").step == 7
    assert (folder / "dlmoe" / "weights.pt").read_bytes() == b"weights"
    verify_folder(folder, target.uri)


def test_no_state_file_is_published_when_a_rank_could_not_write(tmp_path: Path) -> None:
    target = storage.resolve(str(tmp_path / "run")).child(folder_name(7))
    errors = write(Engine(), CheckpointState(step=7), 0, target, lambda v: [v, "rank 1: disk full"])
    assert errors == ["", "rank 1: disk full"] and not (Path(target.path) / STATE_FILE).exists()


def test_storage_that_refuses_the_write_is_named(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("a file where the run folder should be")
    target = storage.resolve(str(tmp_path / "run")).child(folder_name(3))
    (error,) = write(Engine(), CheckpointState(step=3), 0, target, lambda v: [v])
    assert error.startswith(f"rank 0: cannot write {target.uri}: ")


def test_a_checkpoint_missing_a_ranks_checksum_list_does_not_verify(tmp_path: Path) -> None:
    target = storage.resolve(str(tmp_path / "run")).child(folder_name(2))
    assert write(Engine(), CheckpointState(step=2), 0, target, lambda v: [v]) == [""]
    with pytest.raises(CheckpointError, match=r"checksums.json.rank1 is missing \(rank 1 of 2 did not finish"):
        verify_folder(Path(target.path), target.uri, ranks=2)
