"""The ``expert_load`` artifact: one JSON document per logging step, at ``expert_load/step-{step:08d}.json`` in the
run's MLflow artifacts. Written by ``dlmoe.monitor.metrics``, read (and checked) here without torch.

Format ``dlmoe.expert_load``, version 1 (L layers, E experts, R mask-ratio bins)::

    format            "dlmoe.expert_load"
    version           1
    step              the optimizer step the window ends at
    window            {first_step, last_step, steps}: the steps whose routing it counts
    layers, experts   L, E
    dead_fraction     an expert is dead when its share is at most this fraction of 1/E
    tokens_per_expert [L][E] routed slots in the window, summed over all ranks
    share             [L][E] tokens_per_expert over its row sum
    summary           {max_over_mean [L], coefficient_of_variation [L], normalized_entropy [L],
                       dead_experts [L][expert ids]}
    mask_ratio        {edges [R+1] (bin r holds t in [edges[r], edges[r+1])),
                       tokens_per_expert [R][L][E], share [R][L][E], summary [R] (each as above)}

A reader meets a document it cannot use (not JSON, another format, a newer version, shapes that disagree) as an
``ArtifactError`` naming the artifact and the field; the dashboard shows those as warnings and skips them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

FORMAT = "dlmoe.expert_load"
VERSION = 1
FOLDER = "expert_load"
SUMMARY_KEYS = ("max_over_mean", "coefficient_of_variation", "normalized_entropy")
_NAME = re.compile(r"step-(\d{8})\.json$")


class ArtifactError(ValueError):
    """An expert-load artifact that does not follow the format; the message names the artifact and the field."""


def artifact_name(step: int) -> str:
    """Where the artifact of ``step`` lives in the run's artifacts."""
    return f"{FOLDER}/step-{step:08d}.json"


def step_of(path: str) -> int | None:
    """The step in an artifact path (``expert_load/step-00000050.json`` → 50); None for other files."""
    match = _NAME.search(path)
    return int(match.group(1)) if match else None


def bucket_edges(bins: int) -> list[float]:
    """The edges of ``bins`` equal mask-ratio bins over [0, 1]."""
    return [r / bins for r in range(bins + 1)]


@dataclass(frozen=True)
class Summary:
    """Per-layer summaries of one layer × expert share matrix."""

    max_over_mean: list[float]
    coefficient_of_variation: list[float]
    normalized_entropy: list[float]
    dead_experts: list[list[int]]


@dataclass(frozen=True)
class ExpertLoadArtifact:
    """A checked version-1 document."""

    step: int
    first_step: int
    layers: int
    experts: int
    dead_fraction: float
    share: list[list[float]]
    summary: Summary
    edges: list[float]
    bin_share: list[list[list[float]]]
    bin_summary: list[Summary]
    bin_tokens: list[float]

    def to_json(self) -> dict[str, Any]:
        """What the dashboard's browser code gets for a step."""
        return {"step": self.step, "first_step": self.first_step, "layers": self.layers, "experts": self.experts,
                "share": self.share, "summary": self.summary.__dict__, "edges": self.edges,
                "bin_share": self.bin_share, "bin_summary": [s.__dict__ for s in self.bin_summary],
                "bin_tokens": self.bin_tokens}


def parse(name: str, text: str | bytes) -> ExpertLoadArtifact:
    """Check and read the artifact ``name``; raise ``ArtifactError`` saying what is wrong."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{name}: not JSON ({exc})") from exc
    check = _Checker(name)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ArtifactError(f"{name}: not a {FORMAT} document (its 'format' is "
                            f"{doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r})")
    version = check.integer(doc, "version")
    if version != VERSION:
        raise ArtifactError(f"{name}: format version {version}, this dlmoe reads version {VERSION}")
    layers, experts = check.integer(doc, "layers"), check.integer(doc, "experts")
    window = check.field(doc, "window", dict)
    mask = check.field(doc, "mask_ratio", dict)
    edges = [float(v) for v in check.numbers(mask, "edges", "mask_ratio.edges")]
    bins = len(edges) - 1
    if bins < 1:
        raise ArtifactError(f"{name}: field 'mask_ratio.edges' needs at least two edges")
    bin_share = check.field(mask, "share", list, "mask_ratio.share")
    bin_tokens = check.field(mask, "tokens_per_expert", list, "mask_ratio.tokens_per_expert")
    bin_summary = check.field(mask, "summary", list, "mask_ratio.summary")
    if not len(bin_share) == len(bin_tokens) == len(bin_summary) == bins:
        raise ArtifactError(f"{name}: field 'mask_ratio' has {bins} bins by its edges but "
                            f"{len(bin_share)}/{len(bin_tokens)}/{len(bin_summary)} share/token/summary entries")
    return ExpertLoadArtifact(
        step=check.integer(doc, "step"), first_step=check.integer(window, "first_step", "window.first_step"),
        layers=layers, experts=experts, dead_fraction=float(check.field(doc, "dead_fraction", (int, float))),
        share=check.matrix(check.field(doc, "share", list), "share", layers, experts),
        summary=check.summary(check.field(doc, "summary", dict), "summary", layers),
        edges=edges,
        bin_share=[check.matrix(m, f"mask_ratio.share[{r}]", layers, experts) for r, m in enumerate(bin_share)],
        bin_summary=[check.summary(s, f"mask_ratio.summary[{r}]", layers) for r, s in enumerate(bin_summary)],
        bin_tokens=[sum(map(sum, check.matrix(m, f"mask_ratio.tokens_per_expert[{r}]", layers, experts)))
                    for r, m in enumerate(bin_tokens)],
    )


class _Checker:
    def __init__(self, name: str) -> None:
        self.name = name

    def fail(self, key: str, problem: str) -> ArtifactError:
        return ArtifactError(f"{self.name}: field '{key}' {problem}")

    def field(self, doc: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str = "") -> Any:
        if key not in doc:
            raise self.fail(path or key, "is missing")
        value = doc[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise self.fail(path or key, f"has type {type(value).__name__}")
        return value

    def integer(self, doc: dict[str, Any], key: str, path: str = "") -> int:
        value: int = self.field(doc, key, int, path)
        return value

    def numbers(self, doc: Any, key: str, path: str) -> list[float]:
        values = doc.get(key) if isinstance(doc, dict) else doc
        if not isinstance(values, list) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                   for v in values):
            raise self.fail(path, "must be a list of numbers")
        return values

    def matrix(self, value: Any, path: str, rows: int, columns: int) -> list[list[float]]:
        if not isinstance(value, list) or len(value) != rows:
            raise self.fail(path, f"must be a list of {rows} rows (one per layer)")
        for i, row in enumerate(value):
            if len(self.numbers(row, "", f"{path}[{i}]")) != columns:
                raise self.fail(f"{path}[{i}]", f"must have {columns} entries (one per expert)")
        return value

    def summary(self, value: Any, path: str, layers: int) -> Summary:
        if not isinstance(value, dict):
            raise self.fail(path, "must be an object")
        lists = {}
        for key in SUMMARY_KEYS:
            lists[key] = self.numbers(value, key, f"{path}.{key}")
            if len(lists[key]) != layers:
                raise self.fail(f"{path}.{key}", f"must have {layers} entries (one per layer)")
        dead = value.get("dead_experts")
        if not isinstance(dead, list) or len(dead) != layers:
            raise self.fail(f"{path}.dead_experts", f"must be a list of {layers} lists of expert ids")
        return Summary(dead_experts=[[int(e) for e in self.numbers(row, "", f"{path}.dead_experts[{i}]")]
                                     for i, row in enumerate(dead)], **lists)
