"""The Kubernetes platform on one box, for tests/e2e/test_kubernetes.py and ``make demo-k8s`` (tests/e2e/demo_k8s.py):
kmock's Kubernetes emulator served over HTTP, a ``ray start --head`` cluster, the real operator and the KubeRay
double (tests/e2e/kuberay_double.py), started together and stopped together; and the example CR adapted to a local
S3 endpoint and MLflow server.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import yaml
from kubernetes import client, config

from operators.progress import CLIENT_SETTINGS
from tests.e2e.kuberay_double import KubeRayDouble
from tests.integration.operator_harness import emulator, running_operator, write_kubeconfig
from tests.ray_head import RayHead, ray_head

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "jobs/examples/debug-cpu.yaml"
GROUP, VERSION, PLURAL = "dlmoe.io", "v1alpha1", "diffusiontrainingjobs"
CREDENTIALS_SECRET = "local-s3"
# Settings of this process that a pod would not have: the pod's environment is its template's alone.
NOT_IN_A_POD = ("AWS_", "MLFLOW_", "RAY_ADDRESS", "KUBECONFIG")


def example() -> dict[str, Any]:
    return dict(yaml.safe_load(EXAMPLE.read_text()))


def adapt(cr: dict[str, Any], bucket: str, s3_endpoint: str, mlflow_uri: str, overrides: list[str],
          register: str) -> dict[str, Any]:
    """The example CR pointed at ``bucket`` on the S3 endpoint (credentials from the Secret ``CREDENTIALS_SECRET``)
    and at the MLflow server, its exports registered as ``register``, and ``overrides`` as its ``spec.overrides``."""
    spec = cr["spec"]
    spec["storage"] = {"checkpointUri": f"s3://{bucket}/runs", "s3Endpoint": s3_endpoint,
                       "credentialsSecret": {"name": CREDENTIALS_SECRET}}
    spec["mlflow"]["trackingUri"] = mlflow_uri
    spec["export"] = {"register": register}
    spec["overrides"] = overrides
    return cr


def pod_free_env() -> dict[str, str]:
    """This process's environment less what only it has (S3, MLflow, Ray, Kubernetes settings), with dlmoe on
    the PATH as the training image has it: what the Ray head starts with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(NOT_IN_A_POD)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # DeepSpeed compiles its CPU communication op at first use; an image has it built once. Its own folder per
    # virtualenv: in the shared ~/.cache/torch_extensions another virtualenv's build invalidates this one's (the
    # include paths differ), and each training start would compile it again (minutes on 2 busy cores).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return env


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Platform:
    """The running platform, and the user's view of it through the kubernetes client."""

    def __init__(self, api: client.ApiClient, namespace: str, kubeconfig: Path, double: KubeRayDouble,
                 head: RayHead) -> None:
        self.custom, self.core, self.ns = client.CustomObjectsApi(api), client.CoreV1Api(api), namespace
        self.kubeconfig, self.double, self.head = kubeconfig, double, head

    def create_credentials(self, access_key: str, secret_key: str) -> None:
        data = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
        self.core.create_namespaced_secret(self.ns, client.V1Secret(
            metadata=client.V1ObjectMeta(name=CREDENTIALS_SECRET),
            data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()}))

    def apply(self, cr: dict[str, Any]) -> str:
        cr["metadata"]["namespace"] = self.ns
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, cr)
        return str(cr["metadata"]["name"])

    def status(self, name: str) -> dict[str, Any]:
        assert not self.double.errors, f"the KubeRay double broke: {self.double.errors[0]!r}"
        found = cast(dict[str, Any], self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name))
        return dict(found.get("status") or {})

    def rayjobs(self) -> dict[str, dict[str, Any]]:
        found = cast(dict[str, Any], self.custom.list_namespaced_custom_object("ray.io", "v1", self.ns, "rayjobs"))
        return {item["metadata"]["name"]: item for item in found["items"]}

    def events(self, name: str) -> list[tuple[str | None, str | None, str | None]]:
        return [(e.type, e.reason, e.message) for e in self.core.list_namespaced_event(self.ns).items
                if e.involved_object.name == name and e.involved_object.kind == "DiffusionTrainingJob"]

    def kubectl(self, kubectl: str, *args: str) -> str:
        done = subprocess.run([kubectl, "--kubeconfig", str(self.kubeconfig), "--namespace", self.ns, *args],
                              capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout


def find_kubectl() -> str | None:
    """kubectl on the PATH, else the one `make helm` fetches into .tools/."""
    fetched = ROOT / ".tools" / "kubectl"
    return shutil.which("kubectl") or (str(fetched) if os.access(fetched, os.X_OK) else None)


def printer_columns(output: str) -> dict[str, str]:
    """The one row of a ``kubectl get`` table by column name (a blank cell stays blank)."""
    header, row = output.splitlines()
    starts = [header.index(name) for name in header.split()]
    return {header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)}


@contextmanager
def running_platform(work: Path, resync: float = 2.0) -> Iterator[Platform]:
    """Emulated Kubernetes, a Ray head, the operator watching a fresh namespace and the KubeRay double; all
    stopped when the block ends. Sets ``KUBECONFIG`` and the operator's MLflow client settings meanwhile."""
    namespace = f"dlmoe-{uuid.uuid4().hex[:6]}"
    with emulator() as (url, _), ray_head(env=pod_free_env()) as head:
        kubeconfig = write_kubeconfig(url, work / "kubeconfig")
        with _environment({"KUBECONFIG": str(kubeconfig), **CLIENT_SETTINGS}):
            api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
            with running_operator(namespace, None, resync=resync), \
                    KubeRayDouble(api, namespace, head.address, head.token, work / "mounts") as double:
                yield Platform(api, namespace, kubeconfig, double, head)
                if double.errors:
                    raise RuntimeError("the KubeRay double broke") from double.errors[0]
