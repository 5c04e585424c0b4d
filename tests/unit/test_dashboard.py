"""The dashboard's pages and JSON over a local MLflow store (sqlite), called without a network: runs list and
balance flag, run page with heatmap and slider, a run without artifacts, a malformed artifact, unknown runs, an
unreachable store, and the CLI's checks."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dlmoe.cli import main
from dlmoe.monitor.dashboard import Dashboard
from dlmoe.monitor.store import Store
from tests.synthetic_runs import balanced_counts, imbalanced_counts, log_run, one_layer_counts


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def runs(store_uri: str) -> dict[str, str]:
    ids = {"balanced": log_run(store_uri, "balanced", balanced_counts()),
           "skewed": log_run(store_uri, "skewed", imbalanced_counts(), skew_growth=0.5),
           "bare": log_run(store_uri, "bare", balanced_counts(), steps=()),
           "onelayer": log_run(store_uri, "onelayer", one_layer_counts())}
    client = MlflowClient(tracking_uri=store_uri)
    client.log_text(ids["balanced"], "{not json", "expert_load/step-00000040.json")
    client.log_metric(ids["bare"], "loss", 3.0, step=5)
    return ids


@pytest.fixture(scope="module")
def dashboard(store_uri: str, runs: dict[str, str]) -> Iterator[Dashboard]:
    yield Dashboard(Store(store_uri), imbalance_threshold=2.0)


def get(dashboard: Dashboard, path: str) -> tuple[int, str]:
    status, _, body = dashboard.respond(path)
    return status, body.decode()


def test_runs_list_links_every_run_by_name_and_flags_the_imbalanced_one(dashboard: Dashboard,
                                                                      runs: dict[str, str]) -> None:
    status, page = get(dashboard, "/")
    assert status == HTTPStatus.OK
    for name, run_id in runs.items():
        assert f'<a href="/runs/{run_id}">{name}</a>' in page
    flags = dict(re.findall(r'data-run-name="(\w+)".*?data-testid="balance-flag" data-state="(\w+)"', page))
    assert flags == {"balanced": "balanced", "skewed": "imbalanced", "bare": "unknown", "onelayer": "imbalanced"}


def test_the_balance_flag_is_the_worst_layers_and_says_so(dashboard: Dashboard, runs: dict[str, str]) -> None:
    for path in ("/", f"/runs/{runs['onelayer']}"):
        page = get(dashboard, path)[1]
        row = page[page.index(runs["onelayer"]):] if path == "/" else page
        flag = re.search(r'<span class="flag bad" data-testid="balance-flag"[^>]*>([^<]*)</span>', row)
        assert flag is not None, row[:2000]
        # layer 0's 32/11, where the mean over the layers, 1.64, would pass the threshold 2
        assert flag.group(1) == "imbalanced · worst layer L0 max/mean 2.91"
        assert "the worst MoE layer's max/mean token share above 2" in flag.group(0)
    assert "imbalance threshold: the worst layer's max/mean above 2" in get(dashboard, "/")[1]


def test_the_heatmap_titles_its_axes_names_each_cell_and_scales_its_legend_to_the_data(
        dashboard: Dashboard, runs: dict[str, str]) -> None:
    page = get(dashboard, f"/runs/{runs['onelayer']}")[1]
    start = page.index('data-testid="expert-heatmap"')
    grid = page[start:page.index("</svg>", start)]
    assert '>layer</text>' in grid and '>expert</text>' in grid
    assert "<title>layer 0, expert 0: 36.36% of slots (2.91× fair)</title>" in grid
    assert "<title>layer 1, expert 3: 12.50% of slots (1.00× fair)</title>" in grid
    # the busiest expert, 32/11 of fair, reaches the top of the scale; the bottom is its inverse, 11/32
    assert 'data-span="2.90909"' in grid
    assert 'data-role="legend-high">2.91×<' in grid and 'data-role="legend-low">0.34×<' in grid
    assert 'data-testid="imbalance-chart-reference"' in page and ">imbalance threshold 2</text>" in page


def test_run_page_draws_one_cell_per_layer_and_expert_and_a_slider_over_logged_steps(dashboard: Dashboard,
                                                                                   runs: dict[str, str]) -> None:
    status, page = get(dashboard, f"/runs/{runs['skewed']}")
    assert status == HTTPStatus.OK
    grid = page[page.index('data-testid="expert-heatmap"'):page.index('data-testid="dead-experts"')]
    cells = set(re.findall(r'data-layer="(\d+)" data-expert="(\d+)"', grid))
    assert cells == {(str(layer), str(e)) for layer in range(3) for e in range(8)}
    assert json.loads(re.search(r'data-steps="([^"]+)"', page).group(1).replace("&quot;", '"')) == [10, 20, 30]
    assert "layer 1: expert 7" in page  # the dead expert of the newest step
    assert page.count('data-testid="mask-ratio-heatmap"') == 2
    assert 'data-testid="imbalance-chart"' in page and "<polyline" in page


def test_step_query_and_json_give_that_steps_share(dashboard: Dashboard, runs: dict[str, str]) -> None:
    _, page = get(dashboard, f"/runs/{runs['skewed']}?step=10")
    assert 'data-testid="step-label">10<' in page
    status, body = get(dashboard, f"/api/runs/{runs['skewed']}/expert-load/30")
    load = json.loads(body)
    assert status == HTTPStatus.OK and load["step"] == 30
    # expert 0 at step 30: 600 * (1 + 0.5 * 2) = 1200 of 1200 + 6 * 100 (+ 0 for expert 7 in layer 1)
    assert load["share"][1][0] == pytest.approx(1200 / 1800)
    assert get(dashboard, f"/api/runs/{runs['skewed']}/expert-load/11")[0] == HTTPStatus.NOT_FOUND


def test_a_malformed_artifact_is_skipped_with_a_visible_warning(dashboard: Dashboard, runs: dict[str, str]) -> None:
    _, page = get(dashboard, f"/runs/{runs['balanced']}")
    assert 'data-testid="artifact-warning"' in page and "step-00000040.json: not JSON" in page
    assert 'data-testid="expert-heatmap"' in page  # the readable steps still show


def test_a_run_without_artifacts_says_so_and_how_to_enable_them(dashboard: Dashboard, runs: dict[str, str]) -> None:
    status, page = get(dashboard, f"/runs/{runs['bare']}")
    assert status == HTTPStatus.OK
    assert 'data-testid="no-expert-load"' in page and "monitor.expert_load_every" in page
    assert 'data-testid="expert-heatmap"' not in page


@pytest.mark.parametrize("run_id", ["0" * 32, "not-a-run-id"])
def test_unknown_runs_are_a_404_page_that_says_so(dashboard: Dashboard, run_id: str) -> None:
    status, page = get(dashboard, f"/runs/{run_id}")
    assert status == HTTPStatus.NOT_FOUND and f"No run with id &#x27;{run_id}&#x27;" in page
    assert get(dashboard, f"/api/runs/{run_id}/state")[0] == HTTPStatus.NOT_FOUND


def test_assets_are_served_by_the_app_and_nothing_else_is(dashboard: Dashboard) -> None:
    status, kind, body = dashboard.respond("/static/dashboard.js")
    assert status == HTTPStatus.OK and kind.startswith("text/javascript") and b"expert-heatmap" in body
    assert dashboard.respond("/static/../store.py")[0] == HTTPStatus.NOT_FOUND
    _, page = get(dashboard, "/")
    assert not re.search(r'(src|href)="https?://', page)  # no CDN: clusters are often offline


def test_an_unreachable_store_is_a_clear_503_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    status, page = get(Dashboard(Store("http://127.0.0.1:9")), "/")
    assert status == HTTPStatus.SERVICE_UNAVAILABLE
    assert "Tracking store unreachable" in page and "http://127.0.0.1:9" in page and "Traceback" not in page


def test_cli_refuses_a_store_that_does_not_exist_and_creates_none(capsys: pytest.CaptureFixture[str],
                                                                  tmp_path: Path) -> None:
    typo = tmp_path / "typo" / "x.db"
    assert main(["dashboard", "--tracking-uri", f"sqlite:///{typo}", "--port", "0"]) == 2
    assert f"no MLflow tracking store at sqlite:///{typo} (--tracking-uri): {typo} does not exist" in \
        capsys.readouterr().err
    assert not typo.parent.exists()


def test_cli_refuses_a_threshold_that_flags_every_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["dashboard", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--imbalance-threshold", "1"]) == 2
    assert "--imbalance-threshold" in capsys.readouterr().err


def test_metrics_are_prometheus_gauges_of_the_newest_runs(dashboard: Dashboard, runs: dict[str, str]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    status, kind, body = dashboard.respond("/metrics")
    assert status == HTTPStatus.OK and kind.startswith("text/plain; version=")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode()) for s in family.samples}

    def value(name: str, run: str, **labels: str) -> float:
        return samples[name, tuple(sorted({"run": run, "run_id": runs[run], **labels}.items()))]

    assert value("dlmoe_run_imbalanced", "skewed") == 1.0 and value("dlmoe_run_imbalanced", "balanced") == 0.0
    assert value("dlmoe_run_imbalanced", "onelayer") == 1.0  # by its worst layer
    # skewed, newest step (i = 2), layer 1 over both bins: expert 0 has 2 × 1200 slots, experts 1-6 have 2 × 100,
    # expert 7 none: max/mean = 2400 / (3600 / 8)
    assert value("dlmoe_expert_max_over_mean", "skewed", layer="1") == pytest.approx(2400 / (3600 / 8))
    assert value("dlmoe_expert_dead", "skewed", layer="1") == 1.0
    assert value("dlmoe_expert_max_over_mean_by_mask_ratio", "balanced", bin="0") == pytest.approx(1.0)
    assert value("dlmoe_step", "skewed") == 30.0 and value("dlmoe_loss", "bare") == 3.0
    assert samples["dlmoe_tracking_store_up", (("uri", dashboard.store.uri),)] == 1.0


def test_metrics_of_an_unreachable_store_say_it_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    status, _, body = Dashboard(Store("http://127.0.0.1:9")).respond("/metrics")
    assert status == HTTPStatus.OK and 'dlmoe_tracking_store_up{uri="http://127.0.0.1:9"} 0.0' in body.decode()
