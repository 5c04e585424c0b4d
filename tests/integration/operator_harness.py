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
from typing import Any, cast

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


CRD = Path(__file__).resolve().parents[2] / "helm/dlmoe/crds/diffusiontrainingjobs.dlmoe.io.yaml"


def printer_columns() -> dict[str, list[dict[str, Any]]]:
    """``group/version/plural`` → the ``additionalPrinterColumns`` of the chart's CRD."""
    crd = yaml.safe_load(CRD.read_text())
    names = crd["spec"]["names"]
    return {f"{crd['spec']['group']}/{v['name']}/{names['plural']}": v.get("additionalPrinterColumns", [])
            for v in crd["spec"]["versions"]}


def _age(created: str, now: datetime.datetime) -> str:
    seconds = int((now - datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def table(items: list[dict[str, Any]], columns: list[dict[str, Any]]) -> dict[str, Any]:
    """A ``meta.k8s.io/v1`` Table of ``items`` as kube-apiserver renders a custom resource's list for ``kubectl
    get``: a Name column, then the CRD's printer columns (dotted ``jsonPath``s; a ``date`` column as an age)."""
    columns = columns or [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
    now = datetime.datetime.now(datetime.UTC)

    def cell(item: dict[str, Any], column: dict[str, Any]) -> Any:
        value: Any = item
        for part in column["jsonPath"].lstrip(".").split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return _age(value, now) if column["type"] == "date" and isinstance(value, str) else value

    definitions = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}]
    definitions += [{"name": c["name"], "type": "string" if c["type"] == "date" else c["type"], "format": "",
                     "description": c.get("description", ""), "priority": c.get("priority", 0)} for c in columns]
    rows = [{"cells": [item["metadata"]["name"], *(cell(item, c) for c in columns)],
             "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                        "metadata": item["metadata"]}} for item in items]
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": "..."},
            "columnDefinitions": definitions, "rows": rows}


@attrs.define(kw_only=True)
class Cluster(KubernetesEmulator):
    """The emulator plus what a real API server adds: the metadata it assigns (names for ``generateName``,
    ``uid``, ``generation``, ``creationTimestamp``, and a ``resourceVersion`` that changes on every write — kopf's
    JSON patches test it, and expect a 422 when it is stale), lists that name their kind, and lists rendered as a
    Table with the CRD's printer columns when a client asks for one (``kubectl get``)."""

    versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    # API groups this cluster does not serve (e.g. "ray.io" before KubeRay is installed): 404, not in discovery.
    absent: set[str] = attrs.field(factory=set, init=False)

    def _get_resources(self) -> list[Any]:
        return [r for r in super()._get_resources() if r.group not in self.absent]

    async def _serve_list(self, request: Request) -> Any:
        found = cast(dict[str, Any], await super()._serve_list(request))
        resource = request.resource
        assert resource is not None, "a list request names its resource"
        key = f"{resource.group}/{resource.version}/{resource.plural}".lstrip("/")
        if "as=Table" in request.headers.get("Accept", ""):
            return table(found["items"], printer_columns().get(key, []))
        info = self.resources[key]
        api_version = f"{resource.group}/{resource.version}" if resource.group else str(resource.version)
        return {"apiVersion": api_version, "kind": f"{info.kind}List", **found}

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
