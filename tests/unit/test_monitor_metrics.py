"""Expert-load metric maths on hand-made routing counts, the mask-ratio split, and the artifact format."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dlmoe.config import load_job_config
from dlmoe.diffusion import MaskedDiffusionObjective
from dlmoe.errors import ConfigError
from dlmoe.model import build_model, get_flavor
from dlmoe.model.moe import RouterStats
from dlmoe.monitor.artifact import FORMAT, ArtifactError, artifact_name, parse, step_of
from dlmoe.monitor.metrics import ExpertLoadMonitor, ExpertLoadWindow, bucket_counts, mask_bins_B
from dlmoe.tracking import Tracker
from dlmoe.train.step import objective_settings


def routed(experts_TK: list[list[int]], num_experts: int) -> RouterStats:
    chosen = torch.tensor(experts_TK)
    scores = torch.full((chosen.shape[0], num_experts), 1.0 / num_experts)
    return RouterStats(logits_TE=scores.log(), scores_TE=scores, experts_TK=chosen,
                       tokens_per_expert_E=torch.bincount(chosen.reshape(-1), minlength=num_experts))


def test_mask_ratio_bins_are_equal_and_closed_at_one() -> None:
    assert mask_bins_B(torch.tensor([0.0, 0.19, 0.2, 0.99, 1.0]), 5).tolist() == [0, 0, 1, 4, 4]


def test_bucket_counts_split_each_token_by_its_sample_mask_ratio() -> None:
    # 2 samples of 2 tokens, top-2 of 3 experts; sample 0 has t=0.1 (bin 0), sample 1 has t=0.9 (bin 1).
    layer0 = routed([[0, 1], [0, 2], [2, 1], [2, 0]], 3)
    layer1 = routed([[1, 2], [1, 2], [0, 1], [0, 1]], 3)
    counts = bucket_counts([layer0, layer1], torch.tensor([0.1, 0.9]), bins=2)
    assert counts.shape == (2, 2, 3)
    assert counts[0].tolist() == [[2, 1, 1], [0, 2, 2]]
    assert counts[1].tolist() == [[1, 1, 2], [2, 2, 0]]
    torch.testing.assert_close(counts.sum(0), torch.stack([layer0.tokens_per_expert_E,
                                                           layer1.tokens_per_expert_E]).double())


def test_bucket_counts_refuse_tokens_that_do_not_split_into_samples() -> None:
    with pytest.raises(ValueError, match="3 routed tokens do not split into 2 samples"):
        bucket_counts([routed([[0], [1], [0]], 2)], torch.tensor([0.1, 0.2]), bins=2)


def test_bucket_counts_of_the_real_model_sum_to_its_router_counts() -> None:
    job = load_job_config(None, ["model.flavor=debug"])
    model = build_model(get_flavor("debug"), seed=0)
    objective = MaskedDiffusionObjective(objective_settings(job))
    out = objective(model, torch.randint(0, 200, (4, 32)), torch.arange(4), epoch=0)
    counts = bucket_counts(out.router_stats, out.t_B, bins=5)
    torch.testing.assert_close(counts.sum(0), torch.stack([s.tokens_per_expert_E for s in out.router_stats]).double())
    occupied = {int(b) for b in mask_bins_B(out.t_B, 5)}
    assert {r for r in range(5) if counts[r].sum() > 0} == occupied


def window_of(*steps: list[list[list[float]]]) -> ExpertLoadWindow:
    window = ExpertLoadWindow()
    for i, counts in enumerate(steps):
        window.add(torch.tensor(counts, dtype=torch.float64), step=10 + i)
    return window


def test_window_sums_steps_and_summarises_by_hand() -> None:
    # 2 bins, 1 layer, 4 experts. Over both steps: bin 0 [4, 4, 0, 0], bin 1 [4, 4, 4, 0] -> all [8, 8, 4, 0].
    window = window_of([[[2, 2, 0, 0]], [[4, 4, 4, 0]]], [[[2, 2, 0, 0]], [[0, 0, 0, 0]]])
    doc = window.document(dead_fraction=0.1)
    assert doc["format"] == FORMAT and doc["version"] == 1 and doc["step"] == 11
    assert doc["window"] == {"first_step": 10, "last_step": 11, "steps": 2}
    assert doc["tokens_per_expert"] == [[8, 8, 4, 0]]
    assert doc["share"] == [[pytest.approx(0.4), pytest.approx(0.4), pytest.approx(0.2), 0.0]]
    summary = doc["summary"]
    assert summary["max_over_mean"] == [pytest.approx(8 / 5)]  # max 8 over mean 20/4
    assert summary["coefficient_of_variation"] == [pytest.approx(math.sqrt(11) / 5)]  # std sqrt(11), mean 5
    entropy = -2 * 0.4 * math.log(0.4) - 0.2 * math.log(0.2)
    assert summary["normalized_entropy"] == [pytest.approx(entropy / math.log(4))]
    assert summary["dead_experts"] == [[3]]
    mask = doc["mask_ratio"]
    assert mask["edges"] == [0.0, 0.5, 1.0]
    assert mask["tokens_per_expert"] == [[[4, 4, 0, 0]], [[4, 4, 4, 0]]]
    assert mask["summary"][0]["dead_experts"] == [[2, 3]] and mask["summary"][1]["dead_experts"] == [[3]]
    assert mask["summary"][0]["max_over_mean"] == [pytest.approx(2.0)]


def test_dead_fraction_counts_starved_experts_not_only_empty_ones() -> None:
    counts = [[[100, 100, 100, 3]]]  # expert 3 gets 3/303 of the slots, about 4% of its fair share 1/4
    assert window_of(counts).document(dead_fraction=0.0)["summary"]["dead_experts"] == [[]]
    assert window_of(counts).document(dead_fraction=0.1)["summary"]["dead_experts"] == [[3]]


def test_scalars_cover_layers_means_and_only_the_bins_that_got_tokens() -> None:
    window = window_of([[[1, 1], [2, 0]], [[0, 0], [0, 0]], [[3, 1], [1, 1]]])
    metrics = window.scalars(dead_fraction=0.0)
    assert metrics["moe/layer1/max_over_mean"] == pytest.approx(1.5)  # layer 1 over all bins: [3, 1]
    assert metrics["moe/max_over_mean"] == pytest.approx(1.5)  # the worst layer's; layer 0 over all bins: [4, 2]
    assert metrics["moe/t0/max_over_mean"] == pytest.approx(2.0)  # bin 0's worst layer
    assert "moe/t1/max_over_mean" not in metrics
    assert metrics["moe/t2/normalized_entropy"] < 1.0


class Recorder(Tracker):
    def __init__(self) -> None:
        self.artifacts: dict[str, str] = {}

    def log_artifact(self, name: str, content: str) -> None:
        self.artifacts[name] = content


def test_monitor_logs_one_artifact_per_window_and_resets() -> None:
    recorder = Recorder()
    monitor = ExpertLoadMonitor(dead_fraction=0.1, tracker=recorder)
    for step in (1, 2, 3):
        monitor.add(torch.tensor([[[1.0, 3.0]]]), step)
        if step == 2:
            monitor.log_artifact()
    monitor.log_artifact()
    assert sorted(recorder.artifacts) == [artifact_name(2), artifact_name(3)]
    late = parse(artifact_name(3), recorder.artifacts[artifact_name(3)])
    assert (late.first_step, late.step) == (3, 3) and step_of(artifact_name(3)) == 3
    assert monitor.take_scalars()["moe/max_over_mean"] == pytest.approx(1.5)
    assert monitor.take_scalars() == {}


def test_artifact_round_trip() -> None:
    doc = window_of([[[1, 1, 2], [0, 4, 0]], [[2, 2, 0], [1, 1, 2]]]).document(dead_fraction=0.1)
    artifact = parse("expert_load/step-00000010.json", json.dumps(doc))
    assert (artifact.step, artifact.layers, artifact.experts) == (10, 2, 3)
    assert artifact.share == doc["share"] and artifact.bin_share == doc["mask_ratio"]["share"]
    assert artifact.summary.dead_experts == [[], []]  # over both bins: [3, 3, 2] and [1, 5, 2]
    assert artifact.bin_summary[0].dead_experts == [[], [0, 2]]
    assert artifact.bin_tokens == [8.0, 8.0]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: "not json", "not JSON"),
    (lambda d: {**d, "format": "other"}, "not a dlmoe.expert_load document"),
    (lambda d: {**d, "version": 2}, "format version 2, this dlmoe reads version 1"),
    (lambda d: {**d, "layers": 3}, "field 'share' must be a list of 3 rows"),
    (lambda d: {**d, "share": [[0.5, 0.5], [0.5, 0.5]]}, r"field 'share\[0\]' must have 3 entries"),
    (lambda d: {**d, "summary": {**d["summary"], "normalized_entropy": [1.0]}},
     "field 'summary.normalized_entropy' must have 2 entries"),
    (lambda d: {**d, "mask_ratio": {**d["mask_ratio"], "edges": [0, 0.5, 1, 1.5]}}, "3 bins by its edges"),
    (lambda d: {key: value for key, value in d.items() if key != "window"}, "field 'window' is missing"),
])
def test_malformed_artifacts_name_what_is_wrong(edit: object, message: str) -> None:
    doc = window_of([[[1, 1, 2], [0, 4, 0]], [[2, 2, 0], [1, 1, 2]]]).document(dead_fraction=0.1)
    changed = edit(doc)  # type: ignore[operator]
    text = changed if isinstance(changed, str) else json.dumps(changed)
    with pytest.raises(ArtifactError, match=f"step-00000010.json: .*{message}"):
        parse("expert_load/step-00000010.json", text)


@pytest.mark.parametrize(("override", "key"), [("monitor.mask_buckets=0", "monitor.mask_buckets"),
                                                ("monitor.dead_fraction=1.5", "monitor.dead_fraction")])
def test_monitor_settings_are_checked(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_job_config(None, [override])
