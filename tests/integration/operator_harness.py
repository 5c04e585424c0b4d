"""Real parts for the operator tests: kmock's ``KubernetesEmulator`` served over HTTP from its own thread and event
loop, a kubeconfig pointing at it, and the real operator (kopf + the kubernetes client) run in another thread.

The emulator stores objects as sent. A real API server also fills in ``uid``, ``creationTimestamp``,
``generation`` and a name for ``generateName`` (kopf's Events use it); ``Cluster`` does the same on create, so the
operator sees objects shaped as in a cluster. Nothing here stands in for kopf or the client.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import yaml
from kmock import (
    KubernetesEmulator,
    KubernetesError,
    KubernetesResourceNotFoundError,
    Request,
    ResourceInfo,
    Server,
    action,
)

RESOURCES = {
    "dlmoe.io/v1alpha1/diffusiontrainingjobs": ResourceInfo(
        kind="DiffusionTrainingJob", singular="diffusiontrainingjob", namespaced=True, shortnames={"dtj"},
        subresources={"status"}, verbs={"get", "list", "watch", "create", "patch", "update", "delete"}),
    "ray.io/v1/rayjobs": ResourceInfo(kind="RayJob", singular="rayjob", namespaced=True, subresources={"status"},
                                      verbs={"get", "list", "watch", "create", "patch", "delete"}),
    "v1/configmaps": ResourceInfo(kind="ConfigMap", singular="configmap", namespaced=True,
                                  verbs={"get", "list", "watch", "create", "patch", "update", "delete"}),
    "v1/secrets": ResourceInfo(kind="Secret", singular="secret", namespaced=True, verbs={"get", "create"}),
    # Served by every cluster; kopf waits for both in discovery before it starts watching.
    "v1/namespaces": ResourceInfo(kind="Namespace", singular="namespace", namespaced=False, verbs={"get", "list"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ResourceInfo(
        kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False,
        verbs={"get", "list"}),
    "v1/events": ResourceInfo(kind="Event", singular="event", namespaced=True, verbs={"create", "list", "patch"}),
}


@attrs.define(kw_only=True)
class Cluster(KubernetesEmulator):
    """The emulator plus the metadata a real API server assigns: names for ``generateName``, ``uid``,
    ``generation``, ``creationTimestamp``, and a ``resourceVersion`` that changes on every write (kopf's JSON
    patches test it, and expect a 422 when it is stale)."""

    versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    # API groups this cluster does not serve (e.g. "ray.io" before KubeRay is installed): 404, not in discovery.
    absent: set[str] = attrs.field(factory=set, init=False)

    def _get_resources(self) -> list[Any]:
        return [r for r in super()._get_resources() if r.group not in self.absent]

    async def _handle(self, request: Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.resource.group in self.absent:
            raise KubernetesResourceNotFoundError()
        version = str(next(self.versions))
        if request.action == action.UPDATE and isinstance(request.data, dict):
            request.data.setdefault("metadata", {})["resourceVersion"] = version
        elif request.action == action.UPDATE and isinstance(request.data, list):
            request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
        if request.action == action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:6]}"
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("generation", 1)
            meta["resourceVersion"] = version
            meta.setdefault("creationTimestamp",
                            datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as exc:
            # A stale resourceVersion in a JSON patch's "test": the API server answers 422, which kopf expects.
            raise KubernetesError(status=422, reason="Invalid", message=str(exc)) from exc


@contextmanager
def emulator() -> Iterator[tuple[str, Cluster]]:
    """Serve a ``Cluster`` on 127.0.0.1 from a background thread; yields its URL and the cluster."""
    ready: threading.Event = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        cluster = Cluster()
        for key, info in RESOURCES.items():
            cluster.resources[key] = info
        stop = asyncio.Event()
        box["stop"], box["loop"], box["cluster"] = stop, asyncio.get_running_loop(), cluster
        async with cluster, Server(cluster) as server:
            box["url"] = str(server.url).rstrip("/")
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), name="kmock", daemon=True)
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("the Kubernetes emulator did not start within 30 s")
    try:
        yield str(box["url"]), box["cluster"]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(timeout=10)


def write_kubeconfig(url: str, path: Path) -> Path:
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "tester", "user": {"token": "emulator-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester",
                                                      "namespace": "default"}}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def running_operator(namespace: str, mlflow_uri: str | None, resync: float = 0.3) -> Iterator[None]:
    """The operator as ``dlmoe-operator --namespace NS`` builds it, run by kopf in a thread until the block ends."""
    import kopf

    from operators.__main__ import build

    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            kopf.run(registry=build(resync, mlflow_uri), standalone=True, namespaces=[namespace],
                     stop_flag=stop, ready_flag=ready)
        except BaseException as exc:  # handed to the test thread below, which raises it
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=run, name=f"operator-{namespace}", daemon=True)
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("the operator did not become ready within 30 s")
    if errors:
        raise RuntimeError("the operator failed to start") from errors[0]
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=20)
        if thread.is_alive():
            raise RuntimeError("the operator did not stop within 20 s of its stop flag")
        if errors:
            raise RuntimeError("the operator stopped with an error") from errors[0]


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0, interval: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` and the last value otherwise."""
    import time

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last value: {last!r}")
