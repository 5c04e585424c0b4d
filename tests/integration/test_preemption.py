"""A node preempted under a running job, as KubeRay or a spot reclaim does it: Ray drains the node with a deadline,
the workers save a checkpoint on the notice, the node goes, and Ray Train restarts the run on another node from
that checkpoint — ending with the weights of a run that was never interrupted.

The job runs on a two-node cluster of its own, made and unmade by ``preemption_scenario.py`` in another process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dlmoe.config import load_job_config
from dlmoe.train.driver import run_training

SCENARIO = Path(__file__).with_name("preemption_scenario.py")
JOB = ["run_name=preempted", "train.steps=80", "train.warmup_steps=5", "checkpoint.every_steps=5",
       "export.enabled=false", "tracking.enabled=false"]


@pytest.mark.usefixtures("ray_local")
def test_a_drained_node_gets_a_checkpoint_and_the_run_moves_on(tmp_path: Path) -> None:
    clean = run_training(load_job_config(None, [*JOB, f"checkpoint.storage={tmp_path / 'clean'}"]), progress=False)

    summary = tmp_path / "summary.json"
    scenario = subprocess.run([sys.executable, str(SCENARIO), str(tmp_path / "runs"), str(summary), *JOB],
                              capture_output=True, text=True, timeout=600, check=False)
    assert scenario.returncode == 0, (scenario.stdout + scenario.stderr)[-4000:]

    report = json.loads(summary.read_text())
    [interruption] = report["interruptions"]
    assert interruption["cause"] == "preemption" and 5 < interruption["step"] < 80
    assert report["restarts"] == 1 and report["final_step"] == 80
    assert report["params_sha256"] == clean.params_sha256 and report["losses"] == clean.losses
