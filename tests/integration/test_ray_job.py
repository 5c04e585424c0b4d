"""The Ray CLI path: a separate local Ray cluster (`ray start --head` on 127.0.0.1, token authentication on), and
`dlmoe train` submitted to it with `ray job submit --working-dir .`, as a user would against a KubeRay cluster."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from data_pipeline.local_s3 import free_port

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _stop_cluster(marks: tuple[str, ...]) -> None:
    """Stop only this cluster's processes (``ray stop`` would also stop the test session's own Ray)."""
    roots = [p for p in psutil.process_iter(["cmdline"]) if any(m in a for a in p.info["cmdline"] or [] for m in marks)]
    tree = {p.pid: p for p in roots}
    for root in roots:
        try:
            tree.update({c.pid: c for c in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    for process in tree.values():
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(list(tree.values()), timeout=15)


@pytest.fixture
def ray_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    # A short folder: Ray's unix sockets live below it and their paths may not exceed 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="dlmoe-ray-", dir="/tmp"))
    gcs, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # Every port of its own: the test session's Ray already holds the default agent and metrics ports.
    ports = [f"--{name}={free_port()}" for name in (
        "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
    start = subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), *ports,
                            "--num-cpus", "2", "--include-dashboard", "true", "--disable-usage-stats",
                            "--temp-dir", str(temp_dir)],
                           env=env, capture_output=True, text=True, timeout=120, check=False)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _stop_cluster((str(temp_dir), f":{gcs}"))
        shutil.rmtree(temp_dir)


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
