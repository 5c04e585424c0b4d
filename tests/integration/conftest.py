"""Real parts for the integration tier: a moto S3 server on 127.0.0.1 and a local Ray instance (2 CPUs).

The S3 settings go into the environment before Ray starts, so Ray's workers reach the same endpoint with the same
(dummy) credentials through the standard AWS chain, as they would in production.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from data_pipeline.local_s3 import create_bucket, free_port, local_s3_server, wait_until_listening


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    with local_s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str) -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def make_bucket(s3_endpoint: str) -> Callable[[str], str]:
    def make(name: str) -> str:
        create_bucket(s3_endpoint, name)
        return name

    return make


@pytest.fixture
def bucket(make_bucket: Callable[[str], str]) -> str:
    """A fresh bucket for one test."""
    return make_bucket(f"dlmoe-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` process (sqlite backend, local artifact root) on 127.0.0.1."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--default-artifact-root", str(root / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_listening(port, proc, "mlflow server", timeout=90)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
