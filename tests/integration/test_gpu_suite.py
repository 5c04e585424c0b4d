"""bench/gpu_suite.py's CPU dry run (``--smoke``): the device script's plan runs end to end at toy sizes and writes
what the device run writes. Its train step (a Ray launch: a minute or two on this CPU) is left out here; the launch
path itself is tests/integration/test_training.py's, and the full dry run is a command in BENCHMARKS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = [sys.executable, str(ROOT / "bench" / "gpu_suite.py")]


def test_smoke_run_writes_every_result(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run([*SUITE, "--smoke", "--out", str(out), "--steps", "install,tests,gpu_step,sampler"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "suite.json").read_text())
    assert report["mode"] == "smoke"
    assert list(report["steps"]) == ["install", "tests", "gpu_step", "sampler"]
    assert all(step["ok"] for step in report["steps"].values())
    # Without CUDA every CUDA variant is collected and skipped, none lost.
    tests = report["steps"]["tests"]
    assert tests["counts"]["failures"] == tests["counts"]["errors"] == 0
    assert tests["counts"]["skipped"] == tests["counts"]["tests"] == len(tests["cuda_tests"]) >= 5
    assert set(tests["cuda_tests"].values()) == {"skipped"}
    step = json.loads((out / "gpu_step.json").read_text())
    assert step["stack"]["step_s"] > 0 and step["plain"]["step_s"] > 0 and step["stack_over_plain"] > 0
    sampler = json.loads((out / "sampler.json").read_text())
    assert len(sampler["rows"]) == 9 and sampler["device"] == "CPU"
    logs = (out / "logs.txt").read_text()
    assert all(f"===== {name} =====" in logs for name in ("tests", "gpu_step", "sampler"))
    assert "| gpu_step | yes |" in done.stdout


def test_unknown_step_and_missing_output_folder_are_refused(tmp_path: Path) -> None:
    done = subprocess.run([*SUITE, "--smoke", "--steps", "tests,bogus"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "unknown step(s) bogus" in done.stderr
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run(SUITE, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "no output folder: set OUT" in done.stderr
