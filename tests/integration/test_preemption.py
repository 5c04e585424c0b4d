"""A node preempted under a running job, as KubeRay or a spot reclaim does it: Ray drains the node with a deadline,
the workers save a checkpoint on the notice, the node goes, and Ray Train restarts the run on another node from
that checkpoint — ending with the weights of a run that was never interrupted.

The job runs on a cluster of its own (a head without CPUs and one 2-CPU worker node), so that one of its nodes can
be drained and removed without touching the test session's Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dlmoe.config import load_job_config
from dlmoe.train.driver import run_training

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
JOB = ["run_name=preempted", "train.steps=80", "train.warmup_steps=5", "checkpoint.every_steps=5",
       "export.enabled=false", "tracking.enabled=false"]


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    # Ray Train looks for drained nodes every 5 s; a test has no time to wait that long.
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.2")
    # A short folder of its own: Ray's socket paths may not exceed 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="dlmoe-ray-", dir="/tmp")
    nodes = Cluster(initialize_head=True, shutdown_at_exit=False,
                    head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": temp_dir})
    try:
        yield nodes
    finally:
        # Node by node: Cluster.shutdown() would also reset the test session's own Ray connection.
        for node in [*nodes.worker_nodes, nodes.head_node]:
            nodes.remove_node(node)
        record = Path(get_ray_address_file(None))  # the head records its address there whatever its temp_dir
        if record.is_file() and record.read_text().strip() == nodes.address:
            record.unlink()
        shutil.rmtree(temp_dir, ignore_errors=True)  # sockets of killed processes may linger


def _states(run: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in run.glob("checkpoint_*/dlmoe_state.json")]


def _wait_for(what: str, condition: Any, process: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the job ended before {what}: {process.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)


@pytest.mark.usefixtures("ray_local")
def test_a_drained_node_gets_a_checkpoint_and_the_run_moves_on(tmp_path: Path, cluster: Any) -> None:
    clean = run_training(load_job_config(None, [*JOB, f"checkpoint.storage={tmp_path / 'clean'}"]), progress=False)

    storage, summary = tmp_path / "runs", tmp_path / "summary.json"
    node_a = cluster.add_node(num_cpus=2, temp_dir=cluster.head_node.get_temp_dir_path())
    job = subprocess.Popen(
        [sys.executable, "-m", "dlmoe.cli", "train", *JOB, f"checkpoint.storage={storage}", "--no-progress",
         "--summary-json", str(summary)],
        cwd=REPO, env={**os.environ, "RAY_ADDRESS": cluster.address}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        run = storage / "preempted"
        _wait_for("first checkpoint", lambda: _states(run), job)
        drain = subprocess.run(
            [RAY, "drain-node", "--address", cluster.address, "--node-id", node_a.node_id,
             "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
             "--deadline-remaining-seconds", "120"], capture_output=True, text=True, timeout=60, check=False)
        assert drain.returncode == 0, drain.stderr[-2000:]
        _wait_for("checkpoint on the preemption notice", lambda: any(s["interruptions"] for s in _states(run)), job)
        # The reclaim: a fresh node joins, the drained one goes with its workers.
        cluster.add_node(num_cpus=2, temp_dir=cluster.head_node.get_temp_dir_path())
        cluster.remove_node(node_a)
        output, _ = job.communicate(timeout=300)
    finally:
        job.kill()
    assert job.returncode == 0, output[-3000:]

    report = json.loads(summary.read_text())
    [interruption] = report["interruptions"]
    assert interruption["cause"] == "preemption" and 5 < interruption["step"] < 80
    assert report["restarts"] == 1 and report["final_step"] == 80
    assert report["params_sha256"] == clean.params_sha256 and report["losses"] == clean.losses
