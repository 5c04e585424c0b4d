"""Experiment tracking (DESIGN.md §3): one ``Tracker`` interface, an MLflow implementation for rank 0 and a no-op
one for every other rank or when ``tracking.enabled`` is false.

The driver opens the MLflow run (``open_run``): it finds the run of the same ``run_name`` in the experiment — so a
restarted worker group or a relaunched job logs into the same MLflow run — or creates it, logging the flattened
config as params and the resolved YAML as an artifact. Rank 0 then attaches to it by id. The default store is
``sqlite:///<working dir>/mlflow.db`` with artifacts under ``<working dir>/mlartifacts``, resolved on the driver so
that Ray workers running elsewhere write to the same place; ``tracking.uri`` or ``MLFLOW_TRACKING_URI`` override it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from dlmoe.config import JobConfig

RUN_NAME_TAG = "dlmoe.run_name"


class Tracker:
    """The no-op tracker; ``MlflowTracker`` overrides every method."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Record parameters (flat key → value)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record scalar metrics at an optimizer step."""

    def log_artifact(self, name: str, content: str) -> None:
        """Store a text artifact under ``name``."""

    def finish(self) -> None:
        """Close the run (it stays resumable)."""


def tracking_uri(job: JobConfig) -> str:
    """The MLflow tracking URI in force for ``job`` (absolute for a local default store)."""
    return default_tracking_uri(job.tracking.uri)


def default_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else the local store ``mlflow.db`` in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists become JSON strings."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat


def open_run(job: JobConfig) -> str:
    """Find or create the MLflow run of ``job.run_name``; log params and the config once; return its id."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(job)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(job.tracking.experiment)
    if experiment is None:
        artifacts = None if "://" in uri and not uri.startswith("sqlite:") else str(Path.cwd() / "mlartifacts")
        experiment_id = client.create_experiment(job.tracking.experiment, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{job.run_name}'",
                               max_results=1)
    if found:
        return str(found[0].info.run_id)
    run = client.create_run(experiment_id, run_name=job.run_name, tags={RUN_NAME_TAG: job.run_name})
    tracker = MlflowTracker(uri, run.info.run_id)
    tracker.log_params(flatten(job.to_dict()))
    tracker.log_artifact("config.yaml", job.to_yaml())
    return str(run.info.run_id)


class MlflowTracker(Tracker):
    """Logs into an existing MLflow run by id (through the client API: no global active run in the worker)."""

    def __init__(self, uri: str, run_id: str) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        # CPU, memory, disk, network (and GPU where present) every 10 s, as system/... metrics.
        self.system = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=True, tracking_uri=uri)
        self.system.start()

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, name: str, content: str) -> None:
        with tempfile.TemporaryDirectory(prefix="dlmoe-artifact-") as tmp:
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            self.client.log_artifact(self.run_id, str(path), artifact_path=str(Path(name).parent)
                                     if Path(name).parent != Path(".") else None)

    def finish(self) -> None:
        self.system.finish()
        self.client.set_terminated(self.run_id, status="FINISHED")


def register_model_version(uri: str, name: str, source: str, tags: dict[str, str], run_id: str | None = None) -> str:
    """Register the model folder at ``source`` as a new version of MLflow registered model ``name`` (created when
    missing), tagged; returns the version. No alias is set: MLflow reserves ``latest`` for its own meaning —
    ``models:/NAME/latest`` resolves to the highest version, which is the newest export.

    An MLflow server only accepts a local-path source inside the artifact folder of the version's run, so exports
    meant for a server's registry belong in ``s3://`` (a local tracking store takes any path)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.create_registered_model(name, description="LLaDA-MoE models exported by dlmoe")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source, run_id=run_id, tags=tags)
    return str(version.version)


def make_tracker(job: JobConfig, rank: int, run_id: str | None) -> Tracker:
    """MLflow on rank 0 when tracking is on and a run was opened; the no-op tracker otherwise."""
    if rank != 0 or not job.tracking.enabled or run_id is None:
        return Tracker()
    return MlflowTracker(tracking_uri(job), run_id)
