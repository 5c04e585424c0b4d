"""The Ray CLI path: a separate local Ray cluster (`ray start --head` on 127.0.0.1, token authentication on), and
`dlmoe train` submitted to it with `ray job submit --working-dir .`, as a user would against a KubeRay cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ray_head import RAY, ray_head

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ray_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    with ray_head() as head:
        yield head.address, head.env


def test_ray_job_submit_runs_dlmoe_train(ray_cluster: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    address, env = ray_cluster
    summary = tmp_path / "summary.json"
    command = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
               sys.executable, "-m", "dlmoe.cli", "train", "jobs/debug.yaml", "train.steps=4", "train.warmup_steps=1",
               f"checkpoint.storage={tmp_path / 'runs'}", "run_name=submitted", "tracking.enabled=false",
               "export.enabled=false", "--no-progress", "--summary-json", str(summary)]
    # The head's job agent comes up a few seconds after `ray start` returns, and says so; nothing announces it.
    deadline = time.monotonic() + 120
    while True:
        submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=540, check=False)
        not_ready = "No available agent to submit job" in submit.stdout + submit.stderr
        if submit.returncode == 0 or not not_ready or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
    assert "succeeded" in submit.stdout + submit.stderr
    report = json.loads(summary.read_text())
    assert report["run_name"] == "submitted" and report["final_step"] == 4 and len(report["losses"]) == 4
    assert (tmp_path / "runs" / "submitted").is_dir()
