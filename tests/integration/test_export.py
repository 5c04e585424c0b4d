"""`dlmoe export`: a checkpoint of a 2-worker, expert-parallel-2 run and of a 1-worker run stitched into the
release's Hugging Face folder — the same weights and logits as the trained model — and every broken source named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from data_pipeline import storage
from dlmoe.cli import main
from dlmoe.config import load_job_config
from dlmoe.errors import ExportError
from dlmoe.export import load_pretrained
from dlmoe.export.checkpoint import export_checkpoint
from dlmoe.train.driver import run_training
from dlmoe.train.worker import run_checkpoint_states

pytestmark = pytest.mark.usefixtures("ray_local")
JOB = ["train.steps=4", "train.warmup_steps=1", "checkpoint.every_steps=2", "tracking.enabled=false"]


def _run(storage: Path, name: str, workers: int) -> Path:
    job = load_job_config(None, [*JOB, f"checkpoint.storage={storage}", f"run_name={name}",
                                 f"parallel.num_workers={workers}", f"parallel.ep_size={workers}"])
    run_training(job, progress=False)
    return storage / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    storage = tmp_path_factory.mktemp("runs")
    return {workers: _run(storage, f"ep{workers}", workers) for workers in (1, 2)}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_the_exported_checkpoint_is_the_trained_model(runs: dict[int, Path], tmp_path: Path, workers: int,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = runs[workers]
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 4 and report["tensors"] > 0
    # The end of training wrote the live model, gathered across the expert-parallel ranks: the same tensors, bit
    # for bit, and so the same logits.
    trained, exported = _tensors(run / "hf"), _tensors(tmp_path / "hf")
    assert trained.keys() == exported.keys()
    assert all(torch.equal(trained[k], exported[k]) for k in trained)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "hf")(ids).logits, load_pretrained(run / "hf")(ids).logits)
    facts = json.loads((tmp_path / "hf" / "dlmoe.json").read_text())
    assert facts["step"] == 4 and facts["source_run"] == f"ep{workers}" and facts["flavor"] == "debug"


def test_bf16_export(runs: dict[int, Path], tmp_path: Path) -> None:
    result = export_checkpoint(str(runs[2]), str(tmp_path / "bf16"), dtype="bf16")
    model = load_pretrained(tmp_path / "bf16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert result.bytes == sum(t.numel() * 2 for t in _tensors(tmp_path / "bf16").values())


def _copy_run(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of a run to damage, and its newest checkpoint."""
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    return copy, Path(run_checkpoint_states(storage.resolve(str(copy)))[0][1])


def test_a_corrupt_file_is_named_and_a_run_falls_back_to_the_checkpoint_before(runs: dict[int, Path],
                                                                               tmp_path: Path) -> None:
    run, newest = _copy_run(runs[2], tmp_path)
    damaged = newest / "dlmoe" / "layer_1_expert_5_mp_rank_00_model_states.pt"
    damaged.write_bytes(b"garbage")
    with pytest.raises(ExportError, match=r"dlmoe/layer_1_expert_5_mp_rank_00_model_states\.pt does not match"):
        export_checkpoint(str(newest), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="passing over a checkpoint that does not verify"):
        result = export_checkpoint(str(run), str(tmp_path / "out"))
    assert result.step == 2


def test_missing_expert_files_are_named(runs: dict[int, Path], tmp_path: Path) -> None:
    _, newest = _copy_run(runs[2], tmp_path)
    for expert in (3, 6):
        (newest / "dlmoe" / f"layer_0_expert_{expert}_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ExportError, match=r"lacks 2 model file\(s\) \(absent, or in no checksum list\): "
                                          r"dlmoe/layer_0_expert_3_mp_rank_00_model_states\.pt, "
                                          r"dlmoe/layer_0_expert_6_mp_rank_00"):
        export_checkpoint(str(newest), str(tmp_path / "out"))


def test_a_source_that_is_no_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "is neither a checkpoint (no dlmoe_state.json) nor a run folder" in capsys.readouterr().err
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(str(tmp_path / "nowhere"), str(tmp_path / "out"))
