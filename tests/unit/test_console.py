"""The console of dlmoe train (dlmoe.train.console), without Ray: the driver draws the workers' events as one bar
with the warnings above it, and --verbose is what lets Ray's worker output through."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from dlmoe.config import load_job_config
from dlmoe.train import driver
from dlmoe.train.console import DriverConsole


def test_the_driver_draws_one_bar_restarted_in_place_and_the_warnings_above_it() -> None:
    console = DriverConsole.__new__(DriverConsole)  # no channel: draw() is what the polling thread calls
    console.progress, console.file, console.bar = True, io.StringIO(), None
    console.draw([("bar", (4, "train demo from step 0")), ("step", "train demo step 1 loss 2.000"),
                  ("warning", "warning (rank 1): the storage looks unavailable"),
                  ("bar", (2, "train demo from step 2")),  # a restarted worker group, resumed at step 2
                  ("step", "train demo step 3 loss 1.000")])
    console.bar.close()
    lines = [line.rsplit("\r", 1)[-1] for line in console.file.getvalue().split("\n")]
    assert lines[0] == "warning (rank 1): the storage looks unavailable"
    assert lines[1].startswith("train demo step 3 loss 1.000:  50%") and "1/2" in lines[1]
    assert lines[2:] == [""]


def test_verbose_is_what_lets_the_workers_output_through(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import ray

    class Started(Exception):
        pass

    seen: dict[str, Any] = {}

    def init(**kwargs: Any) -> None:
        seen.update(kwargs)
        raise Started

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    job = load_job_config(None, [f"checkpoint.storage={tmp_path}", "tracking.enabled=false"])
    for verbose in (False, True):
        with pytest.raises(Started):
            driver.run_training(job, progress=False, verbose=verbose)
        assert seen["log_to_driver"] is verbose
