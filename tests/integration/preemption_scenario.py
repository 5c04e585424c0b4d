"""The preemption scenario of test_preemption.py, run in a process of its own: a Ray cluster object keeps GCS
clients in the process that made it, which abort that process once the cluster is gone.

A head without CPUs and one 2-CPU worker node A; `dlmoe train` runs on them; after the first checkpoint node A is
drained for preemption (as KubeRay or a spot reclaim does); once the workers have saved a checkpoint on the notice,
a fresh node B joins and node A goes with its workers. Exits with the job's exit code, its output on stdout.

    python tests/integration/preemption_scenario.py STORAGE SUMMARY_JSON JOB_OVERRIDE...
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _states(run: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in run.glob("checkpoint_*/dlmoe_state.json")]


def _wait_for(what: str, condition: Any, job: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if job.poll() is not None:
            raise RuntimeError(f"the job ended before {what}: {job.communicate()[0][-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout} s")
        time.sleep(0.1)


def main(storage: Path, summary: Path, overrides: list[str]) -> int:
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    # Ray Train looks for drained nodes every 5 s; a test has no time to wait that long.
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.2"
    # A short folder of its own: Ray's socket paths may not exceed 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="dlmoe-ray-", dir="/tmp")
    cluster = Cluster(initialize_head=True, shutdown_at_exit=False,
                      head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": temp_dir})
    try:
        node_a = cluster.add_node(num_cpus=2, temp_dir=temp_dir)
        job = subprocess.Popen(
            [sys.executable, "-m", "dlmoe.cli", "train", *overrides, f"checkpoint.storage={storage}",
             "--no-progress", "--summary-json", str(summary)],
            cwd=REPO, env={**os.environ, "RAY_ADDRESS": cluster.address}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        try:
            run = storage / next(o.split("=", 1)[1] for o in overrides if o.startswith("run_name="))
            _wait_for("first checkpoint", lambda: _states(run), job)
            subprocess.run([RAY, "drain-node", "--address", cluster.address, "--node-id", node_a.node_id,
                            "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                            "--deadline-remaining-seconds", "120"], check=True, timeout=60)
            _wait_for("checkpoint on the preemption notice",
                      lambda: any(s["interruptions"] for s in _states(run)), job)
            # The reclaim: a fresh node joins, the drained one goes with its workers.
            cluster.add_node(num_cpus=2, temp_dir=temp_dir)
            cluster.remove_node(node_a)
            output, _ = job.communicate(timeout=300)
        finally:
            job.kill()
        print(output)
        return job.returncode
    finally:
        for node in list(cluster.worker_nodes):
            cluster.remove_node(node)
        if cluster.head_node is not None:
            cluster.remove_node(cluster.head_node)
        record = Path(get_ray_address_file(None))  # the head records its address there whatever its temp_dir
        if record.is_file() and record.read_text().strip() == cluster.address:
            record.unlink()
        shutil.rmtree(temp_dir, ignore_errors=True)  # sockets of killed processes may linger


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]))
