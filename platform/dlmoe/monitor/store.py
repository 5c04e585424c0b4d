"""What the dashboard reads from the MLflow tracking store: runs, metric histories and expert-load artifacts.

Read-only. Every failure to reach the store becomes ``StoreUnavailable`` naming the URI (the dashboard shows it as
a page, not a stack trace); an unknown run id is ``None``; an artifact that does not follow the format is skipped
and reported in ``ExpertLoadSeries.warnings``. Parsed artifacts are cached: an artifact of a step never changes.
"""

from __future__ import annotations

import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlmoe.errors import DlmoeError
from dlmoe.monitor.artifact import FOLDER, ArtifactError, ExpertLoadArtifact, parse, step_of
from dlmoe.tracking import RUN_NAME_TAG

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
LAYER_METRIC = re.compile(r"^moe/layer(\d+)/max_over_mean$")


class StoreUnavailable(DlmoeError):
    """The tracking store at a URI did not answer (or answered with an error)."""


def require_existing(uri: str, where: str) -> None:
    """Refuse a local tracking store (``sqlite:///PATH``, ``file://PATH`` or a folder) that does not exist: MLflow
    would create an empty one at a mistyped path, and a read-only viewer would then say "no runs yet". ``where``
    names the setting the URI came from."""
    scheme, _, rest = uri.partition("://")
    if not rest:
        path = Path(uri)
    elif scheme in ("sqlite", "file"):
        path = Path(rest.removeprefix("/") if scheme == "sqlite" else rest).expanduser()
    else:
        return  # a server: one that does not answer is shown as such, page by page
    if not path.exists():
        raise StoreUnavailable(f"no MLflow tracking store at {uri} ({where}): {path} does not exist, and the "
                               f"dashboard only reads a store, it does not create one")


@dataclass(frozen=True)
class RunSummary:
    """One run as the runs list shows it."""

    run_id: str
    name: str
    experiment: str
    status: str
    start_time: int
    step: int | None
    loss: float | None
    max_over_mean: float | None  # the worst MoE layer's max/mean token share (``worst_layer``)
    dead_experts: float | None
    layers: list[int] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # the latest value of every metric
    worst_layer: int | None = None  # None when the run logged no per-layer figures

    def imbalanced(self, threshold: float) -> bool | None:
        """Whether the latest expert load is out of balance: the worst layer's max/mean above ``threshold`` or a
        dead expert (None: the run logged no expert load)."""
        if self.max_over_mean is None:
            return None
        return self.max_over_mean > threshold or bool(self.dead_experts)


@dataclass
class ExpertLoadSeries:
    """The run's readable expert-load artifacts by step, and a warning for each one skipped."""

    by_step: dict[int, ExpertLoadArtifact]
    warnings: list[str]


class Store:
    """The MLflow client calls of the dashboard, with errors turned into ``StoreUnavailable``."""

    def __init__(self, uri: str, cache_size: int = 512) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.uri = uri
        try:
            self.client = MlflowClient(tracking_uri=uri)
        except MlflowException as exc:  # e.g. a folder store, which MLflow no longer opens by default
            raise StoreUnavailable(f"cannot open the MLflow tracking store at {uri}: {exc.message}") from exc
        self.cache: OrderedDict[tuple[str, str], ExpertLoadArtifact | ArtifactError] = OrderedDict()
        self.cache_size = cache_size
        self.lock = threading.Lock()

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            raise StoreUnavailable(f"the MLflow tracking store at {self.uri} failed to {what}: {exc.message}") from exc
        except (OSError, ValueError) as exc:
            raise StoreUnavailable(f"cannot reach the MLflow tracking store at {self.uri} to {what}: {exc}") from exc

    def runs(self, max_results: int = 200) -> list[RunSummary]:
        """The newest runs of every experiment, newest first."""
        experiments = self._call("list experiments", self.client.search_experiments)
        names = {e.experiment_id: e.name for e in experiments}
        if not names:
            return []
        found = self._call("list runs", self.client.search_runs, list(names), max_results=max_results,
                           order_by=["attributes.start_time DESC"])
        return [self._summary(run, names.get(run.info.experiment_id, "")) for run in found]

    def run(self, run_id: str) -> RunSummary | None:
        """The run with id ``run_id``, or None when the store has no such run."""
        from mlflow.exceptions import MlflowException

        if not RUN_ID.match(run_id):
            return None
        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise StoreUnavailable(f"the MLflow tracking store at {self.uri} failed to read run {run_id}: "
                                   f"{exc.message}") from exc
        except (OSError, ValueError) as exc:
            raise StoreUnavailable(f"cannot reach the MLflow tracking store at {self.uri} to read run {run_id}: "
                                   f"{exc}") from exc
        experiment = self._call("read an experiment", self.client.get_experiment, run.info.experiment_id)
        return self._summary(run, experiment.name if experiment else "")

    def _summary(self, run: Any, experiment: str) -> RunSummary:
        metrics: dict[str, float] = run.data.metrics
        loss_history = self.history(run.info.run_id, "loss") if "loss" in metrics else []
        by_layer = {int(m.group(1)): metrics[m.group(0)] for m in map(LAYER_METRIC.match, metrics) if m}
        # The worst layer, not the mean over layers: one starved layer is what needs looking at.
        worst = max(by_layer, key=lambda layer: by_layer[layer]) if by_layer else None
        return RunSummary(
            run_id=run.info.run_id, name=run.data.tags.get(RUN_NAME_TAG) or run.info.run_name or run.info.run_id,
            experiment=experiment, status=run.info.status, start_time=run.info.start_time or 0,
            step=loss_history[-1][0] if loss_history else None, loss=metrics.get("loss"),
            max_over_mean=metrics.get("moe/max_over_mean") if worst is None else by_layer[worst],
            dead_experts=metrics.get("moe/dead_experts"), layers=sorted(by_layer), metrics=dict(metrics),
            worst_layer=worst)

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of metric ``key``, by step (the last value logged at a step wins)."""
        points = self._call(f"read metric '{key}' of run {run_id}", self.client.get_metric_history, run_id, key)
        by_step = {int(p.step): float(p.value) for p in sorted(points, key=lambda p: (p.step, p.timestamp))}
        return sorted(by_step.items())

    def expert_load(self, run_id: str) -> ExpertLoadSeries:
        """Every expert-load artifact of the run that can be read; the others become warnings."""
        files = self._call(f"list the artifacts of run {run_id}", self.client.list_artifacts, run_id, FOLDER)
        series = ExpertLoadSeries(by_step={}, warnings=[])
        for info in files:
            if info.is_dir or step_of(info.path) is None:
                continue
            artifact = self._artifact(run_id, info.path)
            if isinstance(artifact, ArtifactError):
                series.warnings.append(f"skipped {info.path}: {artifact}")
            else:
                series.by_step[artifact.step] = artifact
        return series

    def _artifact(self, run_id: str, path: str) -> ExpertLoadArtifact | ArtifactError:
        key = (run_id, path)
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        with tempfile.TemporaryDirectory(prefix="dlmoe-dashboard-") as tmp:
            local = self._call(f"download {path} of run {run_id}", self.client.download_artifacts, run_id, path, tmp)
            text = Path(local).read_bytes()
        result: ExpertLoadArtifact | ArtifactError
        try:
            result = parse(path, text)
        except ArtifactError as exc:
            result = exc
        with self.lock:
            self.cache[key] = result
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return result
