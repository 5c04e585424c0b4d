"""``make demo-k8s``: the Kubernetes path on one box, to watch before there is a cluster.

Starts a moto S3 server, a real ``mlflow server``, the Kubernetes emulator, a Ray head, the operator and the KubeRay
double (tests/e2e/k8s_platform.py); applies jobs/examples/debug-cpu.yaml pointed at them (trained for ``--steps``
steps through its ``spec.overrides``); prints the CR's status (``kubectl get dtj`` where kubectl is found) each
time it changes; with ``--stop-at STEP`` stops the Ray job once the status shows that step, as a lost head pod
would, so the retry can be watched; and stops everything at ``Succeeded`` or ``Failed``. Prints the time from
create to the end. The KubeRay double and the emulator are test doubles: this is a demonstration, not a cluster.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from data_pipeline.local_s3 import create_bucket, free_port, local_s3_server
from tests.conftest import start_mlflow_server
from tests.e2e.k8s_platform import Platform, adapt, example, find_kubectl, running_platform


def show(platform: Platform, name: str, kubectl: str | None) -> str:
    if kubectl:
        # A list (the namespace holds this one CR): the emulator renders lists, not single objects, as a Table.
        return platform.kubectl(kubectl, "get", "dtj").rstrip().splitlines()[-1]
    status = platform.status(name)
    progress = status.get("progress", {})
    return (f"{name}  phase {status.get('phase', '-')}  step {progress.get('step', '-')}  loss "
            f"{progress.get('loss', '-')}  attempt {status.get('attempt', '-')}")


def follow(platform: Platform, name: str, stop_at: int | None, timeout: float) -> dict[str, object]:
    kubectl = find_kubectl()
    if kubectl:
        print(platform.kubectl(kubectl, "get", "dtj").splitlines()[0])
    last, stopped, deadline = "", False, time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = platform.status(name)
        line = show(platform, name, kubectl)
        changed = line.rsplit(None, 1)[0] if kubectl else line  # the AGE column changes every second
        if changed != last:
            print(line, flush=True)
            last = changed
        if status.get("phase") in ("Succeeded", "Failed"):
            return status
        step = status.get("progress", {}).get("step", 0)
        if stop_at is not None and not stopped and status.get("phase") == "Running" and step >= stop_at:
            rayjob = str(status["rayJob"])
            print(f"-- stopping the Ray job of {rayjob} (ray job stop), as a lost head pod would end it", flush=True)
            platform.double.stop_ray_job(rayjob)
            stopped = True
        time.sleep(1)
    raise SystemExit(f"demo-k8s: {name} did not end within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo-k8s", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps (the example says 1000; default 40)")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="stop the Ray job once the status shows this step, to watch the retry")
    parser.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dlmoe-demo-k8s-") as tmp:
        work = Path(tmp)
        port = free_port()
        mlflow_uri = f"http://127.0.0.1:{port}"
        mlflow = start_mlflow_server(work, port)
        try:
            with local_s3_server() as endpoint, running_platform(work) as platform:
                create_bucket(endpoint, "dlmoe-demo")
                platform.create_credentials("demo", "demo")
                overrides = [f"train.steps={args.steps}", "train.log_every=1", "checkpoint.every_steps=5"]
                cr = adapt(example(), "dlmoe-demo", endpoint, mlflow_uri, overrides, "debug-cpu-demo")
                started = time.monotonic()
                name = platform.apply(cr)
                print(f"applied DiffusionTrainingJob {platform.ns}/{name} (S3 {endpoint}, MLflow {mlflow_uri})")
                status = follow(platform, name, args.stop_at, args.timeout)
                print(f"{name}: {status['phase']} in {time.monotonic() - started:.0f} s after {status['attempt']} "
                      f"attempt(s); {status.get('message', '')}")
                for kind, reason, message in platform.events(name):
                    print(f"  event {kind} {reason}: {message}")
                return 0 if status["phase"] == "Succeeded" else 1
        finally:
            mlflow.terminate()
            mlflow.wait(timeout=20)


if __name__ == "__main__":
    sys.exit(main())
