"""Synthetic MLflow runs for the dashboard tests: routing counts we choose, logged the way training logs them
(the same ``ExpertLoadWindow`` writes the artifacts, the same metric names)."""

from __future__ import annotations

import json

import torch
from mlflow.tracking import MlflowClient

from dlmoe.monitor.artifact import artifact_name
from dlmoe.monitor.metrics import ExpertLoadWindow
from dlmoe.tracking import RUN_NAME_TAG


def log_run(uri: str, name: str, counts_RLE: torch.Tensor, steps: tuple[int, ...] = (10, 20, 30),
            skew_growth: float = 0.0, experiment: str = "dashboard-tests", finished: bool = True) -> str:
    """A run whose every logged step has the routing counts ``counts_RLE`` (times ``1 + skew_growth * i`` on
    expert 0 at the i-th step); returns its id."""
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run_id: str = client.create_run(experiment_id, run_name=name, tags={RUN_NAME_TAG: name}).info.run_id
    for i, step in enumerate(steps):
        counts = counts_RLE.clone().double()
        counts[..., 0] *= 1 + skew_growth * i
        log_step(uri, run_id, counts, step, loss=5.0 / (1 + i))
    if finished:
        client.set_terminated(run_id, "FINISHED")
    return run_id


def log_step(uri: str, run_id: str, counts_RLE: torch.Tensor, step: int, loss: float) -> None:
    """One logged step: the loss, the expert-load scalars and the artifact of a one-step window."""
    client = MlflowClient(tracking_uri=uri)
    window = ExpertLoadWindow()
    window.add(counts_RLE.double(), step)
    for key, value in {"loss": loss, **window.scalars(dead_fraction=0.1)}.items():
        client.log_metric(run_id, key, value, step=step)
    client.log_text(run_id, json.dumps(window.document(dead_fraction=0.1)), artifact_name(step))


def balanced_counts(bins: int = 2, layers: int = 3, experts: int = 8) -> torch.Tensor:
    return torch.full((bins, layers, experts), 100.0)


def imbalanced_counts(bins: int = 2, layers: int = 3, experts: int = 8) -> torch.Tensor:
    """Expert 0 takes six times its share in every layer and expert 7 gets nothing in layer 1."""
    counts = balanced_counts(bins, layers, experts)
    counts[..., 0] = 600.0
    counts[:, 1, 7] = 0.0
    return counts


def one_layer_counts(bins: int = 2, layers: int = 3, experts: int = 8) -> torch.Tensor:
    """Expert 0 takes 4 times the others' share in layer 0 only: that layer's max/mean is 32/11 (2.91), the mean over
    the layers (32/11 + 1 + 1) / 3 = 1.64."""
    counts = balanced_counts(bins, layers, experts)
    counts[:, 0, 0] = 400.0
    return counts
