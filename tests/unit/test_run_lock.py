"""The run lock (dlmoe.checkpointing.RunLock): a second launch of a run that is training is refused naming the first;
a lock left by a driver that is gone is taken over; the holder renews it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlmoe.checkpointing import LOCK_FILE, RunLock
from dlmoe.cli import main
from dlmoe.config import JobConfig, load_job_config
from dlmoe.errors import ConfigError


def job(tmp_path: Path, timeout: float = 60.0) -> JobConfig:
    return load_job_config(None, [f"checkpoint.storage={tmp_path}", f"checkpoint.lock_timeout_s={timeout}"])


def plant(tmp_path: Path, host: str, pid: int, heartbeat: float) -> Path:
    path = tmp_path / "debug" / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "token": "theirs", "started": "then",
                                "heartbeat": heartbeat}))
    return path


def test_a_second_launch_is_refused_naming_the_first_and_the_lock_goes_with_its_holder(tmp_path: Path) -> None:
    first = RunLock(job(tmp_path))
    first.acquire()
    path = tmp_path / "debug" / LOCK_FILE
    try:
        assert json.loads(path.read_text())["token"] == first.token
        expected = rf"run 'debug' is being trained by {socket.gethostname()} pid \d+ since .* \(its lock " \
                   rf"{tmp_path}/debug/{LOCK_FILE} was renewed"
        with pytest.raises(ConfigError, match=expected) as info:
            RunLock(job(tmp_path)).acquire()
        assert info.value.key == "run_name"
    finally:
        first.release()
    assert not path.exists()
    second = RunLock(job(tmp_path))
    second.acquire()
    second.release()


def test_the_holder_renews_its_heartbeat(tmp_path: Path) -> None:
    lock = RunLock(job(tmp_path, timeout=0.4))
    lock.acquire()
    try:
        path = tmp_path / "debug" / LOCK_FILE
        first = json.loads(path.read_text())["heartbeat"]
        time.sleep(0.35)
        assert json.loads(path.read_text())["heartbeat"] > first
    finally:
        lock.release()


def test_a_lock_of_a_process_of_this_host_that_is_gone_is_taken_over_at_once(tmp_path: Path) -> None:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    plant(tmp_path, socket.gethostname(), int(ended.stdout), heartbeat=time.time())
    lock = RunLock(job(tmp_path))
    started = time.monotonic()
    lock.acquire()
    assert time.monotonic() - started < 5
    assert json.loads((tmp_path / "debug" / LOCK_FILE).read_text())["token"] == lock.token
    lock.release()


def test_a_lock_of_another_host_is_refused_while_renewed_and_taken_once_it_is_not(tmp_path: Path) -> None:
    plant(tmp_path, "other-node", 1, heartbeat=time.time())
    with pytest.raises(ConfigError, match="being trained by other-node pid 1 since then"):
        RunLock(job(tmp_path)).acquire()
    plant(tmp_path, "other-node", 1, heartbeat=time.time() - 120)  # past the 60 s timeout: its driver is gone
    lock = RunLock(job(tmp_path))
    lock.acquire()
    lock.release()
    # Heartbeats that have just stopped (older than two beats, younger than the timeout) are waited out.
    plant(tmp_path, "other-node", 1, heartbeat=time.time() - 2.5)  # beats every 1 s: 2.5 missed, 1.5 s to go
    waiting = RunLock(job(tmp_path, timeout=4.0))
    started = time.monotonic()
    waiting.acquire()
    assert 0.5 <= time.monotonic() - started < 10
    waiting.release()


def test_dlmoe_train_refuses_a_run_in_use_before_starting_anything(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    plant(tmp_path, "other-node", 4242, heartbeat=time.time())
    assert main(["train", f"checkpoint.storage={tmp_path}", "tracking.enabled=false", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "dlmoe: error: run 'debug' is being trained by other-node pid 4242" in err and "key 'run_name'" in err
    assert not (tmp_path / "data").exists()  # refused before the default corpus was tokenized
