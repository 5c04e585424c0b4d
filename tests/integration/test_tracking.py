"""MLflow tracking against a real ``mlflow server``: one run per job, kept across a worker restart and a relaunch,
holding the flattened config, the metric series (validation and checkpoints included), the resolved config and
the expert-load artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dlmoe.config import load_job_config
from dlmoe.train.driver import run_training

pytestmark = pytest.mark.usefixtures("ray_local")


def test_one_mlflow_run_survives_a_restart_and_a_relaunch(mlflow_server: str, tmp_path: Path) -> None:
    overrides = ["train.steps=6", "train.warmup_steps=2", "checkpoint.every_steps=2", "export.enabled=false",
                 f"checkpoint.storage={tmp_path}", f"tracking.uri={mlflow_server}", "tracking.experiment=it",
                 "run_name=tracked", "train.log_every=2", "monitor.expert_load_every=3",
                 "fault_injection.rank=1", "fault_injection.step=3",
                 "train.eval_every=2", f"data.validation={tmp_path / 'data' / 'stdlib-bytes-128'}"]
    first = run_training(load_job_config(None, overrides), progress=False)
    assert first.restarts >= 1 and first.mlflow_run_id
    again = run_training(load_job_config(None, [*overrides, "train.steps=8"]), progress=False)
    assert again.mlflow_run_id == first.mlflow_run_id

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("it")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [first.mlflow_run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["parallel.ep_size"] == "2" and run.data.params["run_name"] == "tracked"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted({m.step for m in history}) == [2, 4, 6, 8]
    assert {m.value for m in history if m.step == 6} == {first.losses[5]}
    for name in ("lr", "tokens_per_s", "balance_loss", "z_loss", "moe/max_over_mean", "moe/layer1/dead_experts",
                 "moe/normalized_entropy"):
        assert name in run.data.metrics, name
    assert any(name.startswith("moe/t") and name.endswith("/max_over_mean") for name in run.data.metrics)
    # The validation curve, one value per evaluation (a restart re-logs the steps it redoes), and the checkpoints.
    val_steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "val_loss")})
    assert val_steps == [2, 4, 6, 8] and [v for _, v in again.val_losses][-1] == run.data.metrics["val_loss"]
    assert run.data.metrics["checkpoint_step"] == 8
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "config.yaml" in artifacts
    loads = sorted(a.path for a in client.list_artifacts(run.info.run_id, "expert_load"))
    assert loads[0] == "expert_load/step-00000003.json" and loads[-1] == "expert_load/step-00000008.json"
    matrix = json.loads(Path(client.download_artifacts(run.info.run_id, loads[0], str(tmp_path))).read_text())
    assert matrix["format"] == "dlmoe.expert_load" and matrix["version"] == 1
    assert matrix["layers"] == 2 and matrix["experts"] == 8 and matrix["window"]["last_step"] == 3
    assert all(abs(sum(row) - 1.0) < 1e-5 for row in matrix["share"])
    assert len(matrix["mask_ratio"]["tokens_per_expert"]) == 5
