"""MLflow down for a while mid-run, against a real ``mlflow server`` stopped and started again on the same store:
logging never waits for it, one warning says so, and every metric logged meanwhile reaches the run, in order."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from data_pipeline.local_s3 import free_port
from dlmoe.tracking import MlflowTracker
from tests.conftest import start_mlflow_server


def test_metrics_logged_while_mlflow_is_down_reach_the_run_in_order(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the tracker's own retries are under test
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    try:
        client = MlflowClient(tracking_uri=uri)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        tracker = MlflowTracker(uri, run_id)
        tracker.STALL_S = 2.0
        for step in range(1, 4):
            tracker.log_metrics({"loss": 10.0 - step}, step)
        deadline = time.monotonic() + 60
        while len(client.get_metric_history(run_id, "loss")) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        server.terminate()
        server.wait(timeout=30)

        with pytest.warns(UserWarning, match=r"MLflow at .* has not taken the run's metrics for \d+ s") as seen:
            for step in range(4, 13):
                started = time.monotonic()
                tracker.log_metrics({"loss": 10.0 - step}, step)
                assert time.monotonic() - started < 0.5  # training does not wait for the server
                time.sleep(0.4)
        assert len([w for w in seen if "has not taken" in str(w.message)]) == 1

        server = start_mlflow_server(tmp_path, port)
        tracker.finish()
        history = client.get_metric_history(run_id, "loss")
        assert [m.step for m in history] == list(range(1, 13))
        assert [m.value for m in history] == [10.0 - step for step in range(1, 13)]
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        server.terminate()
        server.wait(timeout=30)
