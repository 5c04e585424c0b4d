"""A local S3 endpoint: a ``moto`` server on 127.0.0.1, for the integration tests, the benchmarks and for trying
the S3 path without cloud credentials (``moto[server]`` comes with the ``dev`` extra).

``local_s3_server()`` starts it, points the standard AWS environment variables at it (endpoint and dummy
credentials; start Ray afterwards so that its workers inherit them) and restores them on exit. ``create_bucket``
plays the operator who creates buckets: dlmoe itself never does. ``free_port`` and ``wait_until_listening`` serve
any local server a test or benchmark starts (the mlflow server of the integration tier, too).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs

from dlmoe.errors import DlmoeError

_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server this process is about to start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_listening(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    """Block until ``proc`` (a server called ``what``) accepts connections on ``port``; fail if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DlmoeError(f"the {what} exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise DlmoeError(f"the {what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


@contextmanager
def local_s3_server(timeout: float = 30.0) -> Iterator[str]:
    """Run a moto S3 server for the duration of the block; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {key: os.environ.get(key) for key in _ENV}
    try:
        wait_until_listening(port, proc, "moto S3 server", timeout)
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


def create_bucket(endpoint: str, name: str) -> None:
    """Create bucket ``name`` on the S3 endpoint ``endpoint`` (http://host:port)."""
    scheme, _, host = endpoint.partition("://")
    admin = pafs.S3FileSystem(endpoint_override=host, scheme=scheme, region="us-east-1", allow_bucket_creation=True)
    admin.create_dir(name)
