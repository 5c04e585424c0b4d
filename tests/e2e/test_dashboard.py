"""The whole monitoring path: `dlmoe train` logs a real run of the `debug` flavor into a real MLflow server,
`dlmoe dashboard` serves it, and headless Chromium (Debian's, driven by playwright) looks at it — the heatmap's
layers × experts cells (axes titled, each cell named on hover, the colour legend scaled to the data), the slider
over the logged steps, the mask-ratio view, and a deliberately imbalanced synthetic run flagged in the runs list.
Screenshots are saved in the test's output folder for a person to look at.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from data_pipeline.local_s3 import free_port, wait_until_listening
from dlmoe.model import build_model, get_flavor
from dlmoe.model.moe import MoEBlock
from tests.synthetic_runs import balanced_counts, imbalanced_counts, log_run, log_step

CHROMIUM = Path("/usr/bin/chromium")
# As root on a closed network: no sandbox, and none of Chromium's own background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEPS, EVERY, BINS = 6, 2, 5


@pytest.fixture(scope="module")
def trained_run(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`dlmoe train` of the debug flavor, expert load logged every 2 steps; returns its run name."""
    work = tmp_path_factory.mktemp("train")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "dlmoe.cli", "train", f"train.steps={STEPS}", "train.warmup_steps=2",
         f"train.log_every={EVERY}", f"monitor.expert_load_every={EVERY}", f"monitor.mask_buckets={BINS}",
         "parallel.num_workers=1", "parallel.ep_size=1", "export.enabled=false", "run_name=e2e-debug",
         f"tracking.uri={mlflow_server}", "checkpoint.storage=runs", "--no-progress"],
        cwd=work, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, f"dlmoe train failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return "e2e-debug"


@pytest.fixture(scope="module")
def dashboard_url(mlflow_server: str, trained_run: str) -> Iterator[str]:
    log_run(mlflow_server, "imbalanced-synthetic", imbalanced_counts(), skew_growth=0.5)
    log_run(mlflow_server, "balanced-synthetic", balanced_counts())
    port = free_port()
    dlmoe = shutil.which("dlmoe", path=str(Path(sys.executable).parent))
    assert dlmoe, "the dlmoe console script is not installed next to this Python"
    proc = subprocess.Popen([dlmoe, "dashboard", "--tracking-uri", mlflow_server, "--host", "127.0.0.1",
                             "--port", str(port), "--refresh-seconds", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_listening(port, proc, "dlmoe dashboard", timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0]
        assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: `make browser` installs Debian's chromium"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def test_dashboard_in_headless_chromium(dashboard_url: str, browser: object, tmp_path: Path) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    page.goto(dashboard_url)
    flag = page.locator('tr[data-run-name="imbalanced-synthetic"] [data-testid="balance-flag"]')
    expect(flag).to_have_attribute("data-state", "imbalanced")
    expect(page.locator('tr[data-run-name="balanced-synthetic"] [data-testid="balance-flag"]')).to_have_attribute(
        "data-state", "balanced")
    page.screenshot(path=tmp_path / "runs.png", full_page=True)

    page.get_by_role("link", name="e2e-debug", exact=True).click()
    heatmap = page.get_by_test_id("expert-heatmap")
    expect(heatmap).to_be_visible()
    model = build_model(get_flavor("debug"), device="meta")
    moe_layers = sum(isinstance(m, MoEBlock) for m in model.modules())
    experts = get_flavor("debug").num_experts
    expect(heatmap.locator("[data-layer][data-expert]")).to_have_count(moe_layers * experts)
    cell = heatmap.locator('[data-layer="0"][data-expert="0"]')
    expect(cell).to_have_css("fill", _not_default())
    expect(heatmap.locator("text.axis-title")).to_have_text(["expert", "layer"])
    _expect_legend_scaled_to_the_data(heatmap, experts)
    expect(page.get_by_test_id("imbalance-chart-reference")).to_have_text("imbalance threshold 2")
    expect(page.get_by_test_id("step-label")).to_have_text(str(STEPS))
    expect(page.get_by_test_id("mask-ratio-heatmap")).to_have_count(BINS)
    expect(page.get_by_test_id("loss-chart")).to_be_visible()
    expect(page.get_by_test_id("imbalance-chart").locator("polyline")).to_have_count(moe_layers)
    page.screenshot(path=tmp_path / "run-newest-step.png", full_page=True)

    newest_title = cell.locator("title").text_content()
    assert newest_title is not None and newest_title.startswith("layer 0, expert 0: ")
    slider = page.get_by_test_id("step-slider")
    slider.focus()
    page.keyboard.press("Home")  # the first logged step; the page fetches it and repaints
    expect(page.get_by_test_id("step-label")).to_have_text(str(EVERY))
    expect(page.locator("#window-label")).to_have_text(f"window: steps 1–{EVERY}")
    assert page.url.endswith(f"?step={EVERY}")
    assert cell.locator("title").text_content() != newest_title
    _expect_legend_scaled_to_the_data(heatmap, experts)  # scaled again to the step shown
    page.screenshot(path=tmp_path / "run-first-step.png", full_page=True)

    page.goto(dashboard_url)
    page.get_by_role("link", name="imbalanced-synthetic", exact=True).click()
    expect(page.get_by_test_id("dead-experts")).to_contain_text("layer 1: expert 7")
    expect(page.get_by_test_id("balance-flag")).to_have_attribute("data-state", "imbalanced")
    expect(page.get_by_test_id("balance-flag")).to_contain_text("worst layer L")
    page.screenshot(path=tmp_path / "imbalanced.png", full_page=True)

    page.goto(f"{dashboard_url}/runs/{'0' * 32}")
    expect(page.get_by_test_id("error")).to_contain_text("No run with id")
    assert errors == [], f"the page raised: {errors}"
    print(f"screenshots in {tmp_path}")


def test_a_live_runs_page_refreshes_itself_when_a_step_is_logged(dashboard_url: str, browser: object,
                                                                 mlflow_server: str) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    run_id = log_run(mlflow_server, "live-synthetic", balanced_counts(), steps=(5,), finished=False)
    page = browser.new_page()
    page.goto(f"{dashboard_url}/runs/{run_id}")
    expect(page.get_by_test_id("run-status")).to_have_text("RUNNING")
    expect(page.get_by_test_id("step-label")).to_have_text("5")
    log_step(mlflow_server, run_id, imbalanced_counts(), step=10, loss=1.0)  # the dashboard polls every second
    expect(page.get_by_test_id("step-label")).to_have_text("10", timeout=20_000)
    expect(page.get_by_test_id("dead-experts")).to_contain_text("layer 1: expert 7")


def _expect_legend_scaled_to_the_data(heatmap: object, experts: int) -> None:
    """The legend's ends are the data's widest departure from the fair share (pages.colour_span), not a fixed 4x."""
    from playwright.sync_api import Locator, expect

    assert isinstance(heatmap, Locator)
    dead = float(heatmap.page.locator("body").get_attribute("data-dead-fraction") or 0)
    shares = heatmap.locator(".cell").evaluate_all("cells => cells.map((cell) => Number(cell.dataset.share))")
    ratios = [share * experts for share in shares if share * experts > dead]
    span = max([1.25, *ratios, *(1 / r for r in ratios)])
    expect(heatmap.locator('[data-role="legend-high"]')).to_have_text(f"{span:.2f}×")
    expect(heatmap.locator('[data-role="legend-low"]')).to_have_text(f"{1 / span:.2f}×")


def _not_default() -> re.Pattern[str]:
    return re.compile(r"^rgb\((?!238, 238, 238\)).*")  # painted by the page's script, not the CSS placeholder
