"""Progress of a training run, read from its MLflow run (platform/dlmoe/tracking.py logs it).

The run is the one tagged ``dlmoe.run_name = <run name>`` in the job's experiment. Only the latest value (and its
step) of each metric is read — one ``search_runs`` call, whatever the length of the run — and summarised into the
CR's ``status.progress`` and ``status.balance``. Imports MLflow's client only (no torch).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

# Mirrors dlmoe.tracking.RUN_NAME_TAG; importing it would pull in the dlmoe package (and torch through config).
RUN_NAME_TAG = "dlmoe.run_name"
LAYER_METRIC = re.compile(r"^moe/layer(\d+)/max_over_mean$")


class ProgressUnavailable(RuntimeError):
    """MLflow could not be read (unreachable, or it answered with an error); the message says which server."""


# Fail fast on an unreachable server: MLflow's defaults retry for minutes, which would hold up the timer that also
# drives restarts.
CLIENT_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def configure_client() -> None:
    """``CLIENT_SETTINGS`` where the deployment has not set them. Process-wide (MLflow reads them from the
    environment), so the CLI calls it, not the handlers."""
    for key, value in CLIENT_SETTINGS.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class Metric:
    value: float
    step: int


@dataclass(frozen=True)
class Reading:
    """The latest value and step of each metric of the run; ``found`` is false while the run does not exist yet."""

    found: bool
    metrics: dict[str, Metric] = field(default_factory=dict)

    def value(self, key: str) -> float | None:
        metric = self.metrics.get(key)
        return None if metric is None else metric.value

    def step(self, key: str) -> int | None:
        metric = self.metrics.get(key)
        return None if metric is None else metric.step


def read(tracking_uri: str, experiment: str, run: str) -> Reading:
    """The latest metrics of the run tagged ``dlmoe.run_name = run`` in ``experiment``."""
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return Reading(found=False)
        runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run}'",
                                  max_results=1)
    except (MlflowException, OSError) as exc:
        raise ProgressUnavailable(f"MLflow at {tracking_uri}: {exc}") from exc
    if not runs:
        return Reading(found=False)
    metrics = {m.key: Metric(float(m.value), int(m.step)) for m in runs[0].data.to_proto().metrics}
    return Reading(found=True, metrics=metrics)


def summarise(reading: Reading) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(progress, balance)`` for the CR status from a reading; absent metrics are left out."""
    progress: dict[str, Any] = {}
    loss = reading.metrics.get("loss")
    if loss is not None:
        progress["step"], progress["loss"] = loss.step, loss.value
    for key, name in (("tokens_per_s", "tokensPerSecond"), ("lr", "lr"), ("val_loss", "valLoss")):
        value = reading.value(key)
        if value is not None:
            progress[name] = value
    for key, name in (("checkpoint_step", "latestCheckpointStep"), ("export_step", "lastExportStep"),
                      ("export_failed_step", "lastFailedExportStep")):
        value = reading.value(key)
        if value is not None:
            progress[name] = int(value)
    balance: dict[str, Any] = {}
    for key, name in (("moe/max_over_mean", "maxOverMean"), ("moe/coefficient_of_variation", "coefficientOfVariation"),
                      ("moe/normalized_entropy", "normalizedEntropy"), ("moe/dead_experts", "deadExperts")):
        value = reading.value(key)
        if value is not None:
            balance[name] = value
    if "maxOverMean" in balance:
        balance["step"] = reading.step("moe/max_over_mean")
    layers = [(m.value, int(match.group(1))) for key, m in reading.metrics.items()
              if (match := LAYER_METRIC.match(key))]
    if layers:
        worst_value, worst_layer = max(layers)
        balance["worstLayer"], balance["worstLayerMaxOverMean"] = worst_layer, worst_value
    return progress, balance
