"""The dashboard's HTML: pure functions from what the store read to a page (every value escaped).

Pictures are drawn here as inline SVG (line charts) and as grids of cells (heatmaps) whose colour the browser code
(``static/dashboard.js``) sets from each cell's ``data-share``: one colour scale, in one place, for the first
drawing and for every step the slider picks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from html import escape

from dlmoe.monitor.artifact import ExpertLoadArtifact
from dlmoe.monitor.store import RunSummary

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")


def layout(title: str, body: str, *, data: dict[str, str] | None = None) -> str:
    """A whole page: our stylesheet and script, no third-party asset (clusters are often offline)."""
    attrs = "".join(f' data-{escape(k)}="{escape(v)}"' for k, v in (data or {}).items())
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)} · dlmoe</title>'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<link rel="stylesheet" href="/static/dashboard.css"><script defer src="/static/dashboard.js"></script>'
            f'</head><body{attrs}><header><a class="brand" href="/">dlmoe · expert load</a></header>'
            f'<main>{body}</main></body></html>')


def error_page(title: str, message: str) -> str:
    return layout(title, f'<section class="error" data-testid="error"><h1>{escape(title)}</h1>'
                         f'<p>{escape(message)}</p><p><a href="/">All runs</a></p></section>')


def balance_flag(run: RunSummary, threshold: float) -> str:
    state = run.imbalanced(threshold)
    if state is None:
        return '<span class="flag unknown" data-testid="balance-flag" data-state="unknown">no expert load</span>'
    dead = f", {run.dead_experts:.2g} dead experts per layer" if run.dead_experts else ""
    label, css = ("imbalanced", "bad") if state else ("balanced", "ok")
    where = "" if run.worst_layer is None else f"worst layer L{run.worst_layer} "
    return (f'<span class="flag {css}" data-testid="balance-flag" data-state="{label}" '
            f'data-max-over-mean="{run.max_over_mean:.6g}" title="the worst MoE layer\'s max/mean token share above '
            f'{threshold:g}, or a dead expert, flags a run">{label} · {where}max/mean '
            f'{run.max_over_mean:.2f}{escape(dead)}</span>')


def runs_page(runs: Sequence[RunSummary], uri: str, threshold: float, refresh_s: float = 10.0) -> str:
    if not runs:
        body = (f'<h1>Runs</h1><p class="empty" data-testid="no-runs">The tracking store at {escape(uri)} has no '
                'runs yet. Start one with <code>dlmoe train tracking.uri=…</code>.</p>')
        return layout("Runs", body)
    rows = "".join(
        f'<tr data-run-id="{escape(r.run_id)}" data-run-name="{escape(r.name)}">'
        f'<td><a href="/runs/{escape(r.run_id)}">{escape(r.name)}</a></td><td>{escape(r.experiment)}</td>'
        f'<td><span class="status {escape(r.status.lower())}">{escape(r.status)}</span></td>'
        f'<td class="num">{"" if r.step is None else r.step}</td>'
        f'<td class="num">{"" if r.loss is None else f"{r.loss:.4f}"}</td>'
        f'<td>{balance_flag(r, threshold)}</td><td>{_when(r.start_time)}</td></tr>' for r in runs)
    body = (f'<h1>Runs</h1><p class="muted">Tracking store {escape(uri)} · imbalance threshold: the worst '
            f'layer\'s max/mean above {threshold:g}</p><table class="runs" data-testid="runs"><thead><tr>'
            f'<th>Run</th><th>Experiment</th><th>Status</th><th>Step</th><th>Loss</th><th>Expert balance</th>'
            f'<th>Started</th></tr></thead>'
            f'<tbody>{rows}</tbody></table>')
    return layout("Runs", body, data={"live": "true" if any(r.status == "RUNNING" for r in runs) else "false",
                                      "refresh-ms": f"{refresh_s * 1000:.0f}"})


def _when(millis: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(millis / 1000)) + " UTC" if millis else ""


def line_chart(series: dict[str, list[tuple[int, float]]], *, testid: str, y_label: str,
               reference: float | None = None, reference_label: str = "threshold") -> str:
    """An SVG line chart of ``name → [(step, value)]`` with titled axes, ticks, a legend and an optional dashed
    line, labelled ``reference_label``."""
    points = [p for values in series.values() for p in values]
    if not points:
        return f'<p class="empty" data-testid="{testid}">Nothing logged yet.</p>'
    width, height, left, right, top, bottom = 720, 240, 56, 110, 12, 32
    xs = [p[0] for p in points]
    ys = [p[1] for p in points] + ([reference] if reference is not None else [])
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    parts = [f'<line class="axis" x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}"/>',
             f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}"/>']
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        x = x0 + (x1 - x0) * i / 4
        parts.append(f'<text class="tick" x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        parts.append(f'<text class="tick" x="{sx(x):.1f}" y="{height - bottom + 16}" '
                     f'text-anchor="middle">{x:.0f}</text>')
    if reference is not None:
        parts.append(f'<line class="reference" x1="{left}" x2="{width - right}" y1="{sy(reference):.1f}" '
                     f'y2="{sy(reference):.1f}"><title>{escape(reference_label)} {reference:g}</title></line>'
                     f'<text class="reference-label" data-testid="{testid}-reference" x="{width - right - 4}" '
                     f'y="{sy(reference) - 4:.1f}" text-anchor="end">{escape(reference_label)} {reference:g}</text>')
    for i, (name, values) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{path}">'
                     f'<title>{escape(name)}</title></polyline>')
        parts.append(f'<text class="legend" x="{width - right + 8}" y="{top + 12 + 14 * i}" '
                     f'style="fill: {colour}">{escape(name)}</text>')
    parts.append(f'<text class="axis-title" x="{(left + width - right) / 2}" y="{height - 2}" '
                 f'text-anchor="middle">step</text>')
    parts.append(f'<text class="axis-title" transform="translate(12 {(top + height - bottom) / 2:.1f}) rotate(-90)" '
                 f'text-anchor="middle">{escape(y_label)}</text>')
    return (f'<svg class="chart" data-testid="{testid}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{escape(y_label)} by step">{"".join(parts)}</svg>')


MIN_SPAN = 1.25  # the colour scale reaches at least this factor of the fair share either way


def colour_span(share: Sequence[Sequence[float]], dead_fraction: float) -> float:
    """How far the colour scale reaches, as a factor of the fair share 1/E either way (log scale, white at fair):
    the data's widest departure from fair — the busiest expert's share over fair, or fair over the least-used live
    expert's — so the data's extremes take the scale's extremes. ``static/dashboard.js`` (``spanOf``) computes the
    same for each step the slider picks."""
    experts = len(share[0]) if share else 0
    ratios = [v * experts for row in share for v in row if v * experts > dead_fraction]
    return max([MIN_SPAN, *ratios, *(1 / r for r in ratios)])


def heatmap(share: Sequence[Sequence[float]], *, testid: str, dead_fraction: float, extra: str = "",
            cell_height: int = 22) -> str:
    """A layer × expert grid as SVG, its axes titled, with a colour legend scaled to the data (``colour_span``).
    Each cell is a ``rect`` carrying ``data-layer``, ``data-expert`` and ``data-share`` (the browser code colours it
    from them) and a ``title`` naming it on hover."""
    layers, experts = len(share), len(share[0]) if share else 0
    cell_w = max(6, min(48, 720 // max(1, experts)))
    left, top = 58, 8
    grid_w, grid_h = experts * cell_w, layers * cell_height
    width = max(left + grid_w + 8, left + 480)
    every = max(1, -(-experts // 16))  # at most 16 expert labels
    parts = []
    for layer, row in enumerate(share):
        y = top + layer * cell_height
        parts.append(f'<text class="tick" x="{left - 6}" y="{y + cell_height / 2 + 4:.1f}" '
                     f'text-anchor="end">L{layer}</text>')
        parts.extend(f'<rect class="cell" data-layer="{layer}" data-expert="{e}" data-share="{v:.6g}" '
                     f'x="{left + e * cell_w}" y="{y}" width="{cell_w - 1}" height="{cell_height - 1}">'
                     f'<title>layer {layer}, expert {e}: {v * 100:.2f}% of slots ({v * experts:.2f}× fair)</title>'
                     f'</rect>' for e, v in enumerate(row))
    axis_y = top + grid_h + 14
    parts.extend(f'<text class="tick" x="{left + e * cell_w + cell_w / 2:.1f}" y="{axis_y}" '
                 f'text-anchor="middle">{e}</text>' for e in range(0, experts, every))
    parts.append(f'<text class="axis-title" x="{left + grid_w / 2:.1f}" y="{axis_y + 16}" '
                 f'text-anchor="middle">expert</text>')
    parts.append(f'<text class="axis-title" transform="translate(14 {top + grid_h / 2:.1f}) rotate(-90)" '
                 f'text-anchor="middle">layer</text>')
    span = colour_span(share, dead_fraction)
    legend_y = axis_y + 30
    parts.append(f'<g class="colour-legend" data-testid="{testid}-legend" transform="translate({left} {legend_y})">'
                 f'<text class="tick" x="0" y="9">token share vs fair 1/E:</text>'
                 f'<text class="tick" x="200" y="9" text-anchor="end" data-role="legend-low">{1 / span:.2f}×</text>'
                 f'<rect x="204" y="0" width="160" height="10" fill="url(#scale-gradient)"/>'
                 f'<text class="tick" x="284" y="22" text-anchor="middle">1×</text>'
                 f'<text class="tick" x="368" y="9" data-role="legend-high">{span:.2f}×</text>'
                 f'<rect class="dead-swatch" x="414" y="0" width="10" height="10"/>'
                 f'<text class="tick" x="428" y="9">dead</text></g>')
    height = legend_y + 26
    return (f'<svg class="heatmap" data-testid="{testid}" data-experts="{experts}" data-span="{span:.6g}" {extra} '
            f'viewBox="0 0 {width} {height}" style="max-width: {width}px" role="img" '
            f'aria-label="token share per layer and expert">{"".join(parts)}</svg>')


# The colour scale of static/dashboard.js (``colour``), defined once per page for the heatmaps' legends: blue at
# 1/span of the fair share, white at fair, red at span times fair.
SCALE_GRADIENT = ('<svg width="0" height="0" aria-hidden="true" style="position: absolute"><defs>'
                  '<linearGradient id="scale-gradient"><stop offset="0" stop-color="rgb(33, 102, 172)"/>'
                  '<stop offset="0.5" stop-color="rgb(247, 247, 247)"/><stop offset="1" stop-color="rgb(178, 24, 43)"/>'
                  '</linearGradient></defs></svg>')


def dead_list(artifact: ExpertLoadArtifact) -> str:
    items = [f'<li>layer {layer}: expert{"s" if len(ids) > 1 else ""} {", ".join(map(str, ids))}</li>'
             for layer, ids in enumerate(artifact.summary.dead_experts) if ids]
    if not items:
        return (f'<p data-testid="dead-experts" data-count="0">No dead expert in the window ending at step '
                f'{artifact.step} (share at most {artifact.dead_fraction:g} of the fair share).</p>')
    count = sum(len(ids) for ids in artifact.summary.dead_experts)
    return (f'<ul data-testid="dead-experts" data-count="{count}" class="dead">{"".join(items)}</ul>'
            f'<p class="muted">Dead: share at most {artifact.dead_fraction:g} of the fair share 1/E over the window '
            f'ending at step {artifact.step}.</p>')


def mask_ratio_view(artifact: ExpertLoadArtifact) -> str:
    panels = []
    for r, share in enumerate(artifact.bin_share):
        lo, hi = artifact.edges[r], artifact.edges[r + 1]
        imbalance = max(artifact.bin_summary[r].max_over_mean, default=0.0)
        grid = heatmap(share, testid="mask-ratio-heatmap", extra=f'data-bin="{r}"',
                       dead_fraction=artifact.dead_fraction, cell_height=12)
        panels.append(f'<figure class="bin"><figcaption>t ∈ [{lo:g}, {hi:g}) · '
                      f'<span data-role="bin-caption" data-bin="{r}">{artifact.bin_tokens[r]:.0f} slots · worst '
                      f'max/mean {imbalance:.2f}</span></figcaption>'
                      f'{grid}</figure>')
    return f'<div class="bins">{"".join(panels)}</div>'


def run_page(run: RunSummary, *, artifacts: dict[int, ExpertLoadArtifact], warnings: Sequence[str],
             selected: int | None, loss: dict[str, list[tuple[int, float]]],
             imbalance: dict[str, list[tuple[int, float]]], threshold: float, refresh_s: float = 10.0) -> str:
    """The run page: summary, loss, imbalance per layer, the heatmap with its step slider, dead experts, and the
    heatmap per mask-ratio bin."""
    head = (f'<h1>{escape(run.name)}</h1><p class="muted">run {escape(run.run_id)} · experiment '
            f'{escape(run.experiment)} · <span class="status {escape(run.status.lower())}" data-testid="run-status">'
            f'{escape(run.status)}</span> · step {run.step if run.step is not None else "–"} · '
            f'{balance_flag(run, threshold)}</p>')
    notes = "".join(f'<p class="warning" data-testid="artifact-warning">⚠ {escape(w)}</p>' for w in warnings)
    imbalance_chart = line_chart(imbalance, testid="imbalance-chart", y_label="max/mean", reference=threshold,
                                 reference_label="imbalance threshold")
    charts = (f'<section><h2>Loss</h2>{line_chart(loss, testid="loss-chart", y_label="loss")}</section>'
              f'<section><h2>Imbalance per layer (max / mean token share)</h2>'
              f'{imbalance_chart}'
              f'</section>')
    if not artifacts:
        load = ('<section><h2>Expert load</h2><p class="empty" data-testid="no-expert-load">No expert-load '
                'artifacts were logged for this run. dlmoe writes one every <code>monitor.expert_load_every</code> '
                'steps (50 by default) when the model has MoE layers and '
                '<code>tracking.enabled</code> is true.</p></section>')
        return layout(run.name, head + notes + charts + load, data=_page_data(run, [], refresh_s))
    steps = sorted(artifacts)
    step = selected if selected in artifacts else steps[-1]
    artifact = artifacts[step]
    slider = (f'<label class="slider">step <output id="step-label" data-testid="step-label">{step}</output>'
              f'<input type="range" id="step-slider" data-testid="step-slider" min="0" max="{len(steps) - 1}" '
              f'value="{steps.index(step)}" data-steps="{escape(json.dumps(steps))}"></label>'
              f'<span class="muted" id="window-label">window: steps {artifact.first_step}–{artifact.step}</span>')
    grid = heatmap(artifact.share, testid="expert-heatmap", extra=f'data-layers="{artifact.layers}"',
                   dead_fraction=artifact.dead_fraction)
    load = (f'<section><h2>Token share per layer and expert</h2>{SCALE_GRADIENT}{slider}{grid}'
            f'</section><section><h2>Dead experts</h2><div id="dead">{dead_list(artifact)}</div></section>'
            f'<section><h2>By mask ratio t</h2><p class="muted">Each routed slot counted in the bin of its '
            f'sample\'s mask ratio: masked positions all enter as the same embedding, so heavily masked batches '
            f'may route differently.</p><div id="bins">{mask_ratio_view(artifact)}</div></section>')
    return layout(run.name, head + notes + charts + load,
                  data={**_page_data(run, steps, refresh_s), "dead-fraction": f"{artifact.dead_fraction:g}"})


def _page_data(run: RunSummary, steps: list[int], refresh_s: float) -> dict[str, str]:
    return {"run-id": run.run_id, "live": "true" if run.status == "RUNNING" else "false",
            "refresh-ms": f"{refresh_s * 1000:.0f}",
            "signature": signature(run, steps)}


def signature(run: RunSummary, steps: list[int]) -> str:
    """What changes while a run is live (status, newest step, logged expert-load steps): a live page reloads when
    the dashboard's state answer no longer matches the one it was drawn with."""
    return f"{run.status}:{run.step}:{len(steps)}"
