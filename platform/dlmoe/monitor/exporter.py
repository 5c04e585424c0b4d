"""Prometheus metrics of the dashboard (``GET /metrics``): the latest expert load and progress of the newest runs
in the tracking store, for a cluster's Prometheus to scrape and the chart's Grafana dashboard to draw.

Gauges, labelled ``run`` (the run name), ``run_id`` and, per layer, ``layer`` (per mask-ratio bin, ``bin``):
``dlmoe_step``, ``dlmoe_loss``, ``dlmoe_val_loss``, ``dlmoe_tokens_per_second``, ``dlmoe_run_imbalanced`` (1 when the
dashboard flags the run), ``dlmoe_expert_max_over_mean``, ``dlmoe_expert_coefficient_of_variation``,
``dlmoe_expert_normalized_entropy``, ``dlmoe_expert_dead`` (per layer) and ``dlmoe_expert_max_over_mean_by_mask_ratio``
(per bin, the worst layer's). ``dlmoe_tracking_store_up`` is 0 when the store did not answer this scrape.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from dlmoe.monitor.store import Store, StoreUnavailable

RUN_GAUGES = {"dlmoe_step": ("step", "The newest step with a logged loss"),
              "dlmoe_loss": ("loss", "The newest training loss"),
              "dlmoe_val_loss": ("val_loss", "The newest validation loss"),
              "dlmoe_tokens_per_second": ("tokens_per_s", "Training throughput, tokens per second")}
LAYER_GAUGES = {"max_over_mean": "Busiest expert's token share over the mean share, per MoE layer",
                "coefficient_of_variation": "Coefficient of variation of the experts' token shares, per MoE layer",
                "normalized_entropy": "Entropy of the experts' token shares, 1 at perfect balance, per MoE layer",
                "dead_experts": "Experts whose share is at most monitor.dead_fraction of the fair share, per layer"}
LAYER_METRIC = re.compile(r"^moe/layer(\d+)/(\w+)$")
BIN_METRIC = re.compile(r"^moe/t(\d+)/max_over_mean$")


class RunsCollector:
    """Reads the store at every scrape (Prometheus pulls rarely; the store is the one source of truth)."""

    def __init__(self, store: Store, threshold: float, max_runs: int) -> None:
        self.store, self.threshold, self.max_runs = store, threshold, max_runs

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("dlmoe_tracking_store_up", "1 when the MLflow tracking store answered this scrape",
                               labels=["uri"])
        try:
            runs = self.store.runs(max_results=self.max_runs)
        except StoreUnavailable:
            up.add_metric([self.store.uri], 0.0)
            yield up
            return
        up.add_metric([self.store.uri], 1.0)
        yield up
        labels = ["run", "run_id"]
        per_run = {name: GaugeMetricFamily(name, help_, labels=labels) for name, (_, help_) in RUN_GAUGES.items()}
        flagged = GaugeMetricFamily("dlmoe_run_imbalanced", f"1 when the worst layer's max/mean exceeds "
                                    f"{self.threshold:g} or an expert is dead", labels=labels)
        per_layer = {key: GaugeMetricFamily(f"dlmoe_expert_{'dead' if key == 'dead_experts' else key}", help_,
                                            labels=[*labels, "layer"]) for key, help_ in LAYER_GAUGES.items()}
        by_bin = GaugeMetricFamily("dlmoe_expert_max_over_mean_by_mask_ratio", "The worst layer's max/mean in each "
                                   "mask-ratio bin (bin r holds t in [r/R, (r+1)/R))", labels=[*labels, "bin"])
        for run in runs:
            ids = [run.name, run.run_id]
            values = {**run.metrics, **({"step": float(run.step)} if run.step is not None else {})}
            for name, (key, _) in RUN_GAUGES.items():
                if key in values:
                    per_run[name].add_metric(ids, values[key])
            state = run.imbalanced(self.threshold)
            if state is not None:
                flagged.add_metric(ids, float(state))
            for metric, value in run.metrics.items():
                if (layer := LAYER_METRIC.match(metric)) and layer.group(2) in per_layer:
                    per_layer[layer.group(2)].add_metric([*ids, layer.group(1)], value)
                elif bin_match := BIN_METRIC.match(metric):
                    by_bin.add_metric([*ids, bin_match.group(1)], value)
        yield from per_run.values()
        yield flagged
        yield from per_layer.values()
        yield by_bin


def exposition(store: Store, threshold: float, max_runs: int = 50) -> bytes:
    """The Prometheus text format of the newest ``max_runs`` runs."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunsCollector(store, threshold, max_runs))
    return generate_latest(registry)
