"""What `dlmoe train` prints by default (issue 22): the resolved job, one progress bar and one summary — none of the
chatter of Ray, Ray Train, DeepSpeed or MLflow, which stays in Ray's logs unless `--verbose`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dlmoe.config import load_job_config

NOISE = ("Failed to query Ray Train Controller actor state", "TrainingReport(", "Checkpoint successfully created",
         "RayTrainWorker", "TrainController", "DeepSpeed", "INFO mlflow", "Traceback")
SUMMARY = ("run debug: 4 steps, loss ", "validation loss at step 4: ", "MLflow run ", "Hugging Face folder: ",
           "sample (prompt 'def '): ")


def test_a_default_run_prints_the_job_one_progress_bar_and_one_summary(tmp_path: Path) -> None:
    overrides = ["train.steps=4", "train.warmup_steps=0", "checkpoint.storage=runs"]
    # A Ray of its own, as on a fresh machine (no warning about another cluster recorded in /tmp/ray)
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "RAY_ADDRESS": "local"}
    # bytes: text mode would read tqdm's \r (a redraw in place) as a new line
    done = subprocess.run([sys.executable, "-m", "dlmoe.cli", "train", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, timeout=600)
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stderr[-3000:]
    for noise in NOISE:
        assert noise not in stdout + stderr, noise
    job_lines = len(load_job_config(None, overrides).to_yaml().splitlines())
    out = stdout.split("\n")[:-1]
    assert out[0] == "# resolved job configuration (embedded default jobs/debug.yaml)"
    assert [line for line in out[1 + job_lines:] if line] == [line for line in out[-len(SUMMARY):]]
    assert [line[:len(start)] for line, start in zip(out[-len(SUMMARY):], SUMMARY, strict=True)] == list(SUMMARY)
    # stderr: the tokenize bar of the default corpus, then the training bar (tqdm redraws each with \r, in place)
    err = [line for line in stderr.split("\n") if line.strip()]
    assert len(err) == 2 and err[0].startswith("\rtokenize → ") and "train debug from step 0" in err[1], stderr
    assert err[1].rsplit("\r", 1)[-1].startswith("train debug step 4 loss "), err[1][-300:]
    assert len(out) + len(err) <= job_lines + 1 + 1 + len(SUMMARY) + 2
