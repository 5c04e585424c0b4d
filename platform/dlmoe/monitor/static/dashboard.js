// The dlmoe dashboard's browser code: colours the heatmaps, moves them along the logged steps with the slider,
// and reloads a live run's page when something new was logged. No framework, no third-party asset.
"use strict";

// Share relative to the fair share 1/E, on a log scale: blue below, white at fair, red above, reaching its
// extremes at `span` times (or 1/span of) the fair share — the data's own reach (spanOf), not a fixed one.
function colour(share, experts, deadFraction, span) {
  const ratio = share * experts;
  if (ratio <= deadFraction) return "#111111";
  const x = Math.max(-1, Math.min(1, Math.log(Math.max(ratio, 1e-9)) / Math.log(span)));
  const mix = (a, b, t) => Math.round(a + (b - a) * t);
  const [from, to] = x < 0 ? [[247, 247, 247], [33, 102, 172]] : [[247, 247, 247], [178, 24, 43]];
  const t = Math.abs(x);
  return `rgb(${mix(from[0], to[0], t)}, ${mix(from[1], to[1], t)}, ${mix(from[2], to[2], t)})`;
}

// As pages.colour_span: the widest departure from fair among the live experts, at least 1.25x.
function spanOf(grid, deadFraction) {
  const experts = Number(grid.dataset.experts);
  const ratios = [...grid.querySelectorAll(".cell")].map((cell) => Number(cell.dataset.share) * experts)
    .filter((ratio) => ratio > deadFraction);
  return Math.max(1.25, ...ratios, ...ratios.map((ratio) => 1 / ratio));
}

function paint(grid, deadFraction) {
  const experts = Number(grid.dataset.experts);
  const span = spanOf(grid, deadFraction);
  grid.dataset.span = String(span);
  grid.querySelector('[data-role="legend-low"]').textContent = `${(1 / span).toFixed(2)}×`;
  grid.querySelector('[data-role="legend-high"]').textContent = `${span.toFixed(2)}×`;
  for (const cell of grid.querySelectorAll(".cell")) {
    cell.style.fill = colour(Number(cell.dataset.share), experts, deadFraction, span);
  }
}

function fill(grid, share, deadFraction) {
  const experts = Number(grid.dataset.experts);
  for (const cell of grid.querySelectorAll(".cell")) {
    const value = share[Number(cell.dataset.layer)][Number(cell.dataset.expert)];
    cell.dataset.share = String(value);
    cell.querySelector("title").textContent = `layer ${cell.dataset.layer}, expert ${cell.dataset.expert}: ` +
      `${(value * 100).toFixed(2)}% of slots (${(value * experts).toFixed(2)}× fair)`;
  }
  paint(grid, deadFraction);
}

function deadList(load) {
  const rows = load.summary.dead_experts.map((ids, layer) => [layer, ids]).filter(([, ids]) => ids.length);
  const count = rows.reduce((n, [, ids]) => n + ids.length, 0);
  const host = document.getElementById("dead");
  host.replaceChildren();
  if (!rows.length) {
    const p = document.createElement("p");
    p.dataset.testid = "dead-experts";
    p.dataset.count = "0";
    p.textContent = `No dead expert in the window ending at step ${load.step}.`;
    host.append(p);
    return;
  }
  const list = document.createElement("ul");
  list.className = "dead";
  list.dataset.testid = "dead-experts";
  list.dataset.count = String(count);
  for (const [layer, ids] of rows) {
    const item = document.createElement("li");
    item.textContent = `layer ${layer}: expert${ids.length > 1 ? "s" : ""} ${ids.join(", ")}`;
    list.append(item);
  }
  host.append(list);
}

async function showStep(runId, step, deadFraction) {
  const answer = await fetch(`/api/runs/${runId}/expert-load/${step}`);
  const load = await answer.json();
  if (!answer.ok) throw new Error(load.error || `HTTP ${answer.status}`);
  fill(document.querySelector('[data-testid="expert-heatmap"]'), load.share, deadFraction);
  for (const grid of document.querySelectorAll('[data-testid="mask-ratio-heatmap"]')) {
    fill(grid, load.bin_share[Number(grid.dataset.bin)], deadFraction);
  }
  for (const caption of document.querySelectorAll('[data-role="bin-caption"]')) {
    const r = Number(caption.dataset.bin);
    const worst = Math.max(...load.bin_summary[r].max_over_mean);
    caption.textContent = `${Math.round(load.bin_tokens[r])} slots · worst max/mean ${worst.toFixed(2)}`;
  }
  document.getElementById("step-label").textContent = String(load.step);
  document.getElementById("window-label").textContent = `window: steps ${load.first_step}–${load.step}`;
  deadList(load);
  const url = new URL(window.location.href);
  url.searchParams.set("step", String(load.step));
  window.history.replaceState(null, "", url);
}

// While a run is live, reload when its status, step or logged steps change (the runs list simply reloads).
function watchLive(runId) {
  const body = document.body;
  if (body.dataset.live !== "true") return;
  const every = Number(body.dataset.refreshMs || "10000");
  const poll = async () => {
    if (!runId) { window.location.reload(); return; }
    try {
      const answer = await fetch(`/api/runs/${runId}/state`);
      const state = await answer.json();
      if (answer.ok && state.signature !== body.dataset.signature) { window.location.reload(); return; }
    } catch (error) {
      console.warn("dlmoe dashboard: refresh failed", error);
    }
    window.setTimeout(poll, every);
  };
  window.setTimeout(poll, every);
}

document.addEventListener("DOMContentLoaded", () => {
  const deadFraction = Number(document.body.dataset.deadFraction || "0");
  for (const grid of document.querySelectorAll(".heatmap")) paint(grid, deadFraction);
  const slider = document.getElementById("step-slider");
  const runId = document.body.dataset.runId;
  if (slider) {
    const steps = JSON.parse(slider.dataset.steps);
    slider.addEventListener("input", () => {
      document.getElementById("step-label").textContent = String(steps[Number(slider.value)]);
    });
    slider.addEventListener("change", () => {
      showStep(runId, steps[Number(slider.value)], deadFraction).catch((error) => {
        document.getElementById("step-label").textContent = `failed: ${error.message}`;
      });
    });
  }
  watchLive(runId);
});
