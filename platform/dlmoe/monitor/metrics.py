"""Expert-load metrics over a window of steps, split by the diffusion mask ratio.

Every masked position enters the network as the same embedding, so a heavily masked batch may route differently
from a lightly masked one. Each routed slot is therefore counted in the bin of its sample's mask ratio t (``R``
equal bins of [0, 1)), giving counts ``counts_RLE`` [bins, layers, experts]; summing over the bins gives the usual
layer × expert counts. The worker adds each step's counts (all-reduced across ranks) to a window, logs the window's
summary scalars and, every ``monitor.expert_load_every`` steps, the whole window as the ``expert_load`` artifact
(format in ``dlmoe.monitor.artifact``).

Shape suffixes as in ``dlmoe.model.moe``, plus ``R`` (mask-ratio bins) and ``B`` (samples).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from dlmoe.model.balance import ExpertLoad, expert_load
from dlmoe.model.moe import RouterStats
from dlmoe.monitor.artifact import FORMAT, VERSION, artifact_name, bucket_edges
from dlmoe.tracking import Tracker


def mask_bins_B(t_B: torch.Tensor, bins: int) -> torch.Tensor:
    """The bin of each sample's mask ratio: ``floor(t * bins)``, with t = 1 in the last bin."""
    return (t_B.to(torch.float64) * bins).floor().clamp(0, bins - 1).to(torch.long)


def bucket_counts(stats: Sequence[RouterStats], t_B: torch.Tensor, bins: int) -> torch.Tensor:
    """Routed-slot counts [bins, layers, experts] (float64) of one micro-batch: each token's slots go to the bin of
    its sample's t. The tokens of ``stats`` must be the whole micro-batch, sample by sample (no padding removed)."""
    if not stats:
        raise ValueError("bucket_counts needs the router statistics of at least one MoE layer")
    samples = t_B.shape[0]
    tokens, _ = stats[0].experts_TK.shape
    if samples == 0 or tokens % samples:
        raise ValueError(f"{tokens} routed tokens do not split into {samples} samples of equal length")
    device = stats[0].experts_TK.device
    bin_T = mask_bins_B(t_B, bins).to(device).repeat_interleave(tokens // samples)
    num_experts = stats[0].tokens_per_expert_E.shape[0]
    per_layer = [torch.bincount((bin_T[:, None] * num_experts + s.experts_TK).reshape(-1),
                                minlength=bins * num_experts).view(bins, num_experts) for s in stats]
    return torch.stack(per_layer, dim=1).to(torch.float64)


class ExpertLoadWindow:
    """Counts [bins, layers, experts] summed over the steps since the last ``reset``."""

    def __init__(self) -> None:
        self.counts_RLE: torch.Tensor | None = None
        self.first_step = 0
        self.last_step = 0

    def add(self, counts_RLE: torch.Tensor, step: int) -> None:
        """Add the counts of optimizer step ``step`` (1-based)."""
        counts = counts_RLE.detach().to("cpu", torch.float64)
        if self.counts_RLE is None:
            self.counts_RLE, self.first_step = counts.clone(), step
        else:
            self.counts_RLE += counts
        self.last_step = step

    def reset(self) -> None:
        self.counts_RLE = None

    def _counts(self) -> torch.Tensor:
        if self.counts_RLE is None:
            raise ValueError("the expert-load window is empty: add a step's counts first")
        return self.counts_RLE

    def summary(self, dead_fraction: float) -> ExpertLoad:
        """The summary of the layer × expert counts of the window, all mask ratios together."""
        return expert_load(self._counts().sum(0), dead_fraction)

    def scalars(self, dead_fraction: float, prefix: str = "moe") -> dict[str, float]:
        """Per-layer summaries and one over the layers (``moe/layer3/max_over_mean``, ``moe/max_over_mean`` — the
        worst layer's —, …), and per mask-ratio bin the worst layer's imbalance and the layer mean of entropy
        (``moe/t0/max_over_mean``) for the bins that got tokens."""
        counts = self._counts()
        metrics = self.summary(dead_fraction).as_metrics(prefix)
        for r, counts_LE in enumerate(counts):
            if counts_LE.sum() == 0:
                continue
            load = expert_load(counts_LE, dead_fraction)
            metrics[f"{prefix}/t{r}/max_over_mean"] = float(load.max_over_mean.max())
            metrics[f"{prefix}/t{r}/normalized_entropy"] = float(load.normalized_entropy.mean())
        return metrics

    def document(self, dead_fraction: float) -> dict[str, Any]:
        """The window as an ``expert_load`` artifact (version ``VERSION``)."""
        counts = self._counts()
        bins, layers, experts = counts.shape
        total = self.summary(dead_fraction)
        by_bin = [expert_load(counts_LE, dead_fraction) for counts_LE in counts]
        return {
            "format": FORMAT, "version": VERSION, "step": self.last_step,
            "window": {"first_step": self.first_step, "last_step": self.last_step,
                       "steps": self.last_step - self.first_step + 1},
            "layers": layers, "experts": experts, "dead_fraction": dead_fraction,
            "tokens_per_expert": counts.sum(0).tolist(),
            "share": total.share_LE.tolist(),
            "summary": _summary(total),
            "mask_ratio": {
                "edges": bucket_edges(bins),
                "tokens_per_expert": counts.tolist(),
                "share": [load.share_LE.tolist() for load in by_bin],
                "summary": [_summary(load) for load in by_bin],
            },
        }


def _summary(load: ExpertLoad) -> dict[str, Any]:
    return {"max_over_mean": load.max_over_mean.tolist(),
            "coefficient_of_variation": load.coefficient_of_variation.tolist(),
            "normalized_entropy": load.normalized_entropy.tolist(),
            "dead_experts": [torch.nonzero(row).flatten().tolist() for row in load.dead_LE]}


class ExpertLoadMonitor:
    """The training loop's hook (every rank adds, rank 0's tracker logs): each step's counts go to two windows,
    the scalars' (emptied by ``take_scalars`` at every logging step) and the artifact's (emptied by
    ``log_artifact`` every ``monitor.expert_load_every`` steps)."""

    def __init__(self, dead_fraction: float, tracker: Tracker) -> None:
        self.dead_fraction = dead_fraction
        self.tracker = tracker
        self.for_scalars = ExpertLoadWindow()
        self.for_artifact = ExpertLoadWindow()

    def add(self, counts_RLE: torch.Tensor, step: int) -> None:
        self.for_scalars.add(counts_RLE, step)
        self.for_artifact.add(counts_RLE, step)

    def take_scalars(self) -> dict[str, float]:
        """The summary scalars of the steps since the last call ({} for a model without MoE layers)."""
        if self.for_scalars.counts_RLE is None:
            return {}
        metrics = self.for_scalars.scalars(self.dead_fraction)
        self.for_scalars.reset()
        return metrics

    def log_artifact(self) -> None:
        """Log the artifact of the steps since the last one (nothing for a model without MoE layers)."""
        window = self.for_artifact
        if window.counts_RLE is None:
            return
        self.tracker.log_artifact(artifact_name(window.last_step), json.dumps(window.document(self.dead_fraction)))
        window.reset()
