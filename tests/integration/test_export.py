"""`dlmoe export`: a checkpoint of a 2-worker, expert-parallel-2 run and of a 1-worker run stitched into the
release's Hugging Face folder — the same weights and logits as the trained model — and every broken source named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.store.artifact.utils.models import get_model_name_and_version
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from data_pipeline import storage
from dlmoe.checkpointing import find_checkpoints
from dlmoe.cli import main
from dlmoe.config import load_job_config
from dlmoe.errors import ConfigError, ExportError
from dlmoe.export import load_pretrained
from dlmoe.export.checkpoint import export_checkpoint
from dlmoe.export.remote import local_folder
from dlmoe.train.driver import run_training

pytestmark = pytest.mark.usefixtures("ray_local")
JOB = ["train.steps=4", "train.warmup_steps=1", "checkpoint.every_steps=2", "tracking.enabled=false"]


def _run(storage: Path, name: str, workers: int, zero: int) -> Path:
    job = load_job_config(None, [*JOB, f"checkpoint.storage={storage}", f"run_name={name}",
                                 f"parallel.num_workers={workers}", f"parallel.ep_size={workers}",
                                 f"parallel.zero_stage={zero}"])
    run_training(job, progress=False)
    return storage / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Runs by ``ep{size}-zero{stage}``."""
    storage = tmp_path_factory.mktemp("runs")
    return {f"ep{w}-zero{z}": _run(storage, f"ep{w}-zero{z}", w, z) for w, z in ((1, 1), (2, 1), (2, 2))}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return out


@pytest.mark.parametrize("layout", ["ep1-zero1", "ep2-zero1", "ep2-zero2"])
def test_the_exported_checkpoint_is_the_trained_model(runs: dict[str, Path], tmp_path: Path, layout: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = runs[layout]
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--json", "--register", "by-hand",
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 4 and report["tensors"] > 0 and report["registered_version"] == "1"
    [version] = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_model_versions("name = 'by-hand'")
    assert version.source == str(tmp_path / "hf") and version.tags["dlmoe.step"] == "4"
    # The end of training wrote the live model, gathered across the expert-parallel ranks: the same tensors, bit
    # for bit, and so the same logits.
    trained, exported = _tensors(run / "hf"), _tensors(tmp_path / "hf")
    assert trained.keys() == exported.keys()
    assert all(torch.equal(trained[k], exported[k]) for k in trained)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "hf")(ids).logits, load_pretrained(run / "hf")(ids).logits)
    facts = json.loads((tmp_path / "hf" / "dlmoe.json").read_text())
    assert facts["step"] == 4 and facts["source_run"] == layout and facts["flavor"] == "debug"


def test_bf16_export(runs: dict[str, Path], tmp_path: Path) -> None:
    result = export_checkpoint(str(runs["ep2-zero1"]), str(tmp_path / "bf16"), dtype="bf16")
    model = load_pretrained(tmp_path / "bf16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert result.bytes == sum(t.numel() * 2 for t in _tensors(tmp_path / "bf16").values())


def _copy_run(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of a run to damage, and its newest checkpoint."""
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    return copy, Path(find_checkpoints(storage.resolve(str(copy)))[0].location.path)


def test_a_corrupt_file_is_named_and_a_run_falls_back_to_the_checkpoint_before(runs: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    run, newest = _copy_run(runs["ep2-zero1"], tmp_path)
    damaged = newest / "dlmoe" / "layer_1_expert_5_mp_rank_00_model_states.pt"
    damaged.write_bytes(b"garbage")
    with pytest.raises(ExportError, match=r"dlmoe/layer_1_expert_5_mp_rank_00_model_states\.pt does not match"):
        export_checkpoint(str(newest), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="passing over a checkpoint that does not verify"):
        result = export_checkpoint(str(run), str(tmp_path / "out"))
    assert result.step == 2


def test_a_target_that_cannot_be_written_is_not_taken_for_a_bad_checkpoint(runs: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("not a model")
    with pytest.raises(ExportError, match="exists and is not a model folder; refusing to overwrite it"):
        export_checkpoint(str(runs["ep2-zero1"]), str(occupied))
    assert (occupied / "notes.txt").read_text() == "not a model"


def test_missing_expert_files_are_named(runs: dict[str, Path], tmp_path: Path) -> None:
    _, newest = _copy_run(runs["ep2-zero1"], tmp_path)
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


def test_checkpoints_are_exported_beside_training_and_registered(mlflow_server: str, bucket: str,
                                                                 tmp_path: Path) -> None:
    models = f"s3://{bucket}/models/auto"
    job = load_job_config(None, [*JOB, "train.steps=6", f"checkpoint.storage={tmp_path}", "run_name=auto",
                                 "parallel.num_workers=2", "parallel.ep_size=2", "export.every_n_checkpoints=1",
                                 f"export.uri={models}", "export.register=dlmoe-auto", "tracking.enabled=true",
                                 f"tracking.uri={mlflow_server}", "tracking.experiment=exports"])
    result = run_training(job, progress=False)
    assert result.export == models
    for step in (2, 4):  # the periodic checkpoints (the one of step 6 is the final model's)
        with local_folder(f"{models}-step-{step:08d}") as folder:
            assert json.loads((folder / "dlmoe.json").read_text())["step"] == step
            assert load_pretrained(folder).config.num_experts == 8
    with local_folder(models) as folder:
        assert json.loads((folder / "dlmoe.json").read_text())["step"] == 6

    client = MlflowClient(mlflow_server)
    versions = sorted(client.search_model_versions("name = 'dlmoe-auto'"), key=lambda v: int(v.version))
    # The two checkpoint exports ran beside training in either order; the final model came last.
    assert {v.source: v.tags["dlmoe.step"] for v in versions} == {
        f"{models}-step-00000002": "2", f"{models}-step-00000004": "4", models: "6"}
    assert versions[-1].source == models
    assert {v.tags["dlmoe.run_name"] for v in versions} == {"auto"}
    assert get_model_name_and_version(client, "models:/dlmoe-auto/latest") == ("dlmoe-auto", versions[-1].version)
    exported = client.get_metric_history(result.mlflow_run_id, "export_step")
    assert sorted(m.step for m in exported) == [2, 4]


def test_a_failing_export_never_stops_training(mlflow_server: str, tmp_path: Path) -> None:
    job = load_job_config(None, [*JOB, f"checkpoint.storage={tmp_path}", "run_name=unexportable",
                                 "export.every_n_checkpoints=1", "export.uri=s3://no-such-bucket-for-exports/m",
                                 "tracking.enabled=true", f"tracking.uri={mlflow_server}",
                                 "tracking.experiment=exports"])
    result = run_training(job, progress=False)
    assert result.final_step == 4 and result.export == ""
    client = MlflowClient(mlflow_server)
    failed = client.get_metric_history(result.mlflow_run_id, "export_failed_step")
    assert sorted(m.step for m in failed) == [2, 4]  # the checkpoint of step 2, then the final model
    reports = [a.path for a in client.list_artifacts(result.mlflow_run_id, "exports")]
    assert reports == ["exports/failed-step-00000002.txt", "exports/failed-step-00000004.txt"]
    text = Path(client.download_artifacts(result.mlflow_run_id, reports[0], str(tmp_path))).read_text()
    assert "no-such-bucket-for-exports" in text


def _start_from(folder: str, storage: Path, name: str, workers: int, *extra: str) -> Path:
    # A learning rate of 1e-30 moves no fp32 weight: the checkpoints hold exactly the weights started from.
    job = load_job_config(None, [*JOB, "train.lr=1e-30", f"model.init_from={folder}", f"checkpoint.storage={storage}",
                                 f"run_name={name}", f"parallel.num_workers={workers}", f"parallel.ep_size={workers}",
                                 "export.enabled=false", *extra])
    run_training(job, progress=False)
    return storage / name


def test_import_then_export_is_identical_at_either_expert_parallel_size(runs: dict[str, Path], bucket: str,
                                                                        tmp_path: Path) -> None:
    source = runs["ep2-zero1"] / "hf"
    in_s3 = f"s3://{bucket}/models/start"
    for path in sorted(source.iterdir()):
        storage.write_bytes(storage.resolve(f"{in_s3}/{path.name}"), path.read_bytes())
    started = _tensors(source)
    for workers, folder in ((1, in_s3), (2, str(source))):
        run = _start_from(folder, tmp_path, f"from-hf-ep{workers}", workers)
        export_checkpoint(str(run), str(tmp_path / f"out-ep{workers}"))
        exported = _tensors(tmp_path / f"out-ep{workers}")
        assert exported.keys() == started.keys()
        assert all(torch.equal(exported[k], started[k]) for k in started), f"ep_size {workers}"


def test_init_from_another_model_is_refused_naming_the_fields(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"holds another model than the job's: hidden_size \(job 32, folder 64\)"):
        _start_from(str(runs["ep1-zero1"] / "hf"), tmp_path, "mismatch", 1, "model.hidden_size=32")
    with pytest.raises(ConfigError, match=r"cannot start from .*nowhere: .*is not a model folder"):
        _start_from(str(tmp_path / "nowhere"), tmp_path, "missing", 1)
