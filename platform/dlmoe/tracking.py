"""Experiment tracking (DESIGN.md §3): one ``Tracker`` interface, an MLflow implementation for rank 0 and a no-op
one for every other rank or when ``tracking.enabled`` is false.

The driver opens the MLflow run (``open_run``): it finds the run of the same ``run_name`` in the experiment — so a
restarted worker group or a relaunched job logs into the same MLflow run — or creates it, logging the flattened
config as params and the resolved YAML as an artifact. Rank 0 then attaches to it by id. The default store is
``sqlite:///<working dir>/mlflow.db`` with artifacts under ``<working dir>/mlartifacts``, resolved on the driver so
that Ray workers running elsewhere write to the same place; ``tracking.uri`` or ``MLFLOW_TRACKING_URI`` override it.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dlmoe.config import JobConfig

RUN_NAME_TAG = "dlmoe.run_name"
ERROR_TAG = "dlmoe.error"  # why the run failed (fail_run)
MAX_TAG_CHARS = 5000  # within every MLflow store's limit on a tag value


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
    for batch in _param_batches(flatten(job.to_dict())):
        client.log_batch(run.info.run_id, params=batch)
    _send_artifact(client, run.info.run_id, "config.yaml", job.to_yaml())
    return str(run.info.run_id)


def _param_batches(params: dict[str, Any]) -> list[list[Any]]:
    """Params as MLflow takes them: values cut to its 6000 characters, 100 to a request."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    return [items[start:start + 100] for start in range(0, len(items), 100)]


def _send_artifact(client: Any, run_id: str, name: str, content: str) -> None:
    """Store ``content`` as the text artifact ``name`` (a path inside the run's artifacts) of run ``run_id``."""
    with tempfile.TemporaryDirectory(prefix="dlmoe-artifact-") as tmp:
        path = Path(tmp) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        client.log_artifact(run_id, str(path), artifact_path=str(Path(name).parent)
                            if Path(name).parent != Path(".") else None)


class MlflowTracker(Tracker):
    """Logs into an existing MLflow run by id (through the client API: no global active run in the worker).

    Nothing the training loop logs waits for the server: every call is queued, and one thread sends the queue in
    order, retrying what the server does not take (every ``RETRY_S``). So an MLflow server that is down or slow for a
    while neither stops nor slows training; what was logged meanwhile reaches the run, in order, once it is back.
    One warning says so when the oldest entry has waited ``STALL_S``; a line on stderr when the queue has drained
    again. ``finish`` waits up to ``flush_timeout_s`` for the queue, then warns with the number of entries lost.
    """

    STALL_S = 10.0
    RETRY_S = 2.0

    def __init__(self, uri: str, run_id: str, flush_timeout_s: float = 300.0) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        from mlflow.tracking import MlflowClient

        self.uri, self.client, self.run_id, self.flush_timeout_s = uri, MlflowClient(tracking_uri=uri), run_id, \
            flush_timeout_s
        self.client.update_run(run_id, status="RUNNING")
        # CPU, memory, disk, network (and GPU where present) every 10 s, as system/... metrics.
        self.system = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=True, tracking_uri=uri)
        self.system.start()
        self.queue: collections.deque[tuple[float, Callable[[], object]]] = collections.deque()
        self.changed = threading.Condition()
        self.closing = self.abandon = self.stalled = False
        self.last_error: BaseException | None = None
        self.sender = threading.Thread(target=self._send_in_order, name="dlmoe-mlflow", daemon=True)
        self.sender.start()

    def _put(self, send: Callable[[], object]) -> None:
        now = time.monotonic()
        with self.changed:
            self.queue.append((now, send))
            self.changed.notify_all()
            waited = now - self.queue[0][0]
            if waited > self.STALL_S and not self.stalled:
                self.stalled = True
                warnings.warn(f"MLflow at {self.uri} has not taken the run's metrics for {waited:.0f} s "
                              f"({self.last_error or 'no answer yet'}); training goes on and {len(self.queue)} "
                              f"entries are kept, in order, until it does", stacklevel=3)

    def _send_in_order(self) -> None:
        while True:
            with self.changed:
                while not self.queue and not self.closing:
                    self.changed.wait()
                if not self.queue or self.abandon:
                    return
                _, send = self.queue[0]
            try:
                send()
            except Exception as exc:  # kept at the head of the queue and sent again: nothing logged is dropped
                self.last_error = exc
                with self.changed:
                    self.changed.wait_for(lambda: self.abandon, timeout=self.RETRY_S)
                continue
            with self.changed:
                self.queue.popleft()
                if not self.queue and self.stalled:
                    self.stalled = False
                    print(f"MLflow at {self.uri} takes the run's metrics again; every buffered entry reached it",
                          file=sys.stderr)
                self.changed.notify_all()

    def log_params(self, params: dict[str, Any]) -> None:
        for batch in _param_batches(params):
            self._put(functools.partial(self.client.log_batch, self.run_id, params=batch))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)  # when it was logged, not when it reached the server
        batch = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        self._put(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_artifact(self, name: str, content: str) -> None:
        self._put(functools.partial(_send_artifact, self.client, self.run_id, name, content))

    def finish(self) -> None:
        """Send what is queued (waiting up to ``flush_timeout_s``), then mark the run finished."""
        self.system.finish()
        self._put(lambda: self.client.set_terminated(self.run_id, status="FINISHED"))
        with self.changed:
            self.closing = True
            self.changed.notify_all()
            drained = self.changed.wait_for(lambda: not self.queue, timeout=self.flush_timeout_s)
            left = len(self.queue)
            self.abandon = not drained
            self.changed.notify_all()
        self.sender.join(timeout=self.RETRY_S + 30)
        if not drained:
            warnings.warn(f"MLflow at {self.uri} did not take the run's last {left} entries within "
                          f"{self.flush_timeout_s:.0f} s ({self.last_error}); they are lost (the checkpoints are not)",
                          stacklevel=2)


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


def fail_run(job: JobConfig, run_id: str, message: str) -> None:
    """Mark the MLflow run ``run_id`` FAILED, with ``message`` in its ``ERROR_TAG`` tag and its note (the description
    the MLflow UI shows): the driver's word on a run whose workers failed for good."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(job))
    client.set_tag(run_id, ERROR_TAG, message[:MAX_TAG_CHARS])
    client.set_tag(run_id, "mlflow.note.content", message[:MAX_TAG_CHARS])
    client.set_terminated(run_id, status="FAILED")


def make_tracker(job: JobConfig, rank: int, run_id: str | None) -> Tracker:
    """MLflow on rank 0 when tracking is on and a run was opened; the no-op tracker otherwise."""
    if rank != 0 or not job.tracking.enabled or run_id is None:
        return Tracker()
    return MlflowTracker(tracking_uri(job), run_id)
