"""Shared test set-up: tier markers follow the folder (unit/, integration/, e2e/); a real MLflow server for the
integration and e2e tiers, and a moto S3 server with a bucket maker."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from data_pipeline.local_s3 import create_bucket, free_port, local_s3_server, wait_until_listening

TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen[bytes]:
    """A real ``mlflow server`` process on 127.0.0.1:``port`` keeping its runs (sqlite) and artifacts in ``root``,
    listening when this returns; started again on the same folder, it serves the same runs."""
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--default-artifact-root", str(root / "artifacts"), "--workers", "1"],
                            # No job runner: its eight consumer processes serve MLflow's GenAI jobs, which no test
                            # uses, and slow the server's start on two cores.
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_listening(port, proc, "mlflow server", timeout=90)
    except BaseException:
        stop_mlflow_server(proc)
        raise
    return proc


def stop_mlflow_server(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and every process under it: its job runner's consumers can outlive a terminated server."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        try:
            member.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(family, timeout=20)
    for member in alive:
        member.kill()
    proc.wait(timeout=20)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` process (sqlite backend, local artifact root) on 127.0.0.1."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_mlflow_server(proc)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1; the standard AWS variables point at it while it runs (data_pipeline.local_s3)."""
    with local_s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def make_bucket(s3_endpoint: str) -> Callable[[str], str]:
    def make(name: str) -> str:
        create_bucket(s3_endpoint, name)
        return name

    return make
