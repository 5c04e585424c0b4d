"""A separate local Ray cluster for the tests that submit jobs to it: ``ray start --head`` on 127.0.0.1 with token
authentication on, every port its own (a test session's in-process Ray already holds the default agent and metrics
ports), stopped by killing only its own processes."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from data_pipeline.local_s3 import free_port

RAY = str(Path(sys.executable).parent / "ray")


@dataclass(frozen=True)
class RayHead:
    """``address``: the dashboard's URL (the Ray Jobs API); ``env``: an environment whose Ray CLI and SDK calls
    carry the cluster's token; ``token``: that token, for an ``Authorization: Bearer`` header."""

    address: str
    env: dict[str, str]
    token: str


def _stop_cluster(marks: tuple[str, ...]) -> None:
    """Stop only this cluster's processes (``ray stop`` would also stop the test session's own Ray)."""
    roots = [p for p in psutil.process_iter(["cmdline"]) if any(m in a for a in p.info["cmdline"] or [] for m in marks)]
    tree = {p.pid: p for p in roots}
    for root in roots:
        try:
            tree.update({c.pid: c for c in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    for process in tree.values():
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(list(tree.values()), timeout=15)


@contextmanager
def ray_head(num_cpus: int = 2, env: Mapping[str, str] | None = None) -> Iterator[RayHead]:
    """A Ray head of ``num_cpus`` CPUs started with ``env`` (default: this process's), stopped when the block ends."""
    # A short folder: Ray's unix sockets live below it and their paths may not exceed 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="dlmoe-ray-", dir="/tmp"))
    gcs, dashboard = free_port(), free_port()
    token = secrets.token_hex(32)
    head_env = {**(os.environ if env is None else env), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    ports = [f"--{name}={free_port()}" for name in (
        "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
    try:
        start = subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), *ports,
                                "--num-cpus", str(num_cpus), "--include-dashboard", "true", "--disable-usage-stats",
                                "--temp-dir", str(temp_dir)],
                               env=head_env, capture_output=True, text=True, timeout=300, check=False)
        if start.returncode != 0:
            raise RuntimeError(f"ray start --head failed:\n{start.stderr[-2000:]}")
        yield RayHead(f"http://127.0.0.1:{dashboard}", head_env, token)
    finally:
        _stop_cluster((str(temp_dir), f":{gcs}"))
        # With --temp-dir, `ray start` records its address in that folder, not in /tmp/ray/ray_current_cluster
        # where the next `ray.init()` on this machine would look: removing the folder leaves no record behind.
        shutil.rmtree(temp_dir, ignore_errors=True)
