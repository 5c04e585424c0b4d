"""Real parts for the integration tier: a moto S3 server on 127.0.0.1 and a local Ray instance (2 CPUs).

The S3 settings go into the environment before Ray starts, so Ray's workers reach the same endpoint with the same
(dummy) credentials through the standard AWS chain, as they would in production.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs
import pytest

from data_pipeline import storage


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not listen on port {port} within {timeout} s")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_REGION")}
    try:
        _wait_for_port(port, proc)
        os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"})
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str) -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()


def create_bucket(name: str) -> None:
    """Create a bucket as an operator would (dlmoe itself never creates buckets)."""
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    admin = pafs.S3FileSystem(endpoint_override=endpoint.split("://", 1)[1], scheme="http", region="us-east-1",
                              allow_bucket_creation=True)
    admin.create_dir(name)
    assert storage.resolve(f"s3://{name}").fs.get_file_info(name).type == pafs.FileType.Directory


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A fresh bucket for one test."""
    name = f"dlmoe-{uuid.uuid4().hex[:12]}"
    create_bucket(name)
    return name
