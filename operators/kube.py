"""The Kubernetes calls the reconciler makes, through the official client: CRs get and patch (spec.suspend), their
status patch, ConfigMaps get/create/patch/delete, Secrets get, RayJobs get/list/create/delete. kopf adds the CRs'
list/watch/patch (finalizer, annotations), the RayJobs' list/watch and Events create. The chart's RBAC grants exactly
these. Each 404 or 409 that means something to the reconciler becomes a named outcome here, so the reconciler never
inspects HTTP codes.
"""

from __future__ import annotations

import os
from typing import Any, cast

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from operators.render import GROUP, LABEL_JOB, PLURAL, RAY_GROUP, RAY_PLURAL, RAY_VERSION, VERSION

# The generated client's default patch type for core resources is a JSON patch (a list of operations); our patches
# are partial objects, so every patch names its type.
MERGE_PATCH = "application/merge-patch+json"


class KubeRayMissing(RuntimeError):
    """The ``ray.io/v1`` RayJob API is not served: KubeRay's CRDs are not installed."""


class InputMissing(LookupError):
    """A ConfigMap, Secret or key the spec refers to does not exist (yet); the message names it."""


def load_config() -> client.Configuration:
    """In a pod, the service account; elsewhere, the kubeconfig (``KUBECONFIG`` or ~/.kube/config). Returns the
    configuration now in force, which kopf's login also reads (operators/handlers.py)."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        # KUBECONFIG is read now: the client's own default was fixed when it was first imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # type: ignore[no-untyped-call]
    return client.Configuration.get_default_copy()


def connection_info() -> kopf.ConnectionInfo:
    """kopf's credentials from the same configuration as the client's: one source for both API users."""
    found = load_config()
    header = found.get_api_key_with_prefix("BearerToken") or found.get_api_key_with_prefix("authorization")
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=found.host, ca_path=found.ssl_ca_cert, insecure=not found.verify_ssl,
        username=found.username or None, password=found.password or None,
        scheme=scheme or None, token=token or None,
        certificate_path=found.cert_file, private_key_path=found.key_file)


def _custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi()


def _core() -> client.CoreV1Api:
    return client.CoreV1Api()


def get_job(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return cast(dict[str, Any], _custom().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def patch_job_status(namespace: str, name: str, patch: dict[str, Any]) -> None:
    _custom().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": patch},
                                                    _content_type=MERGE_PATCH)


def patch_job_spec(namespace: str, name: str, patch: dict[str, Any]) -> None:
    _custom().patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": patch},
                                             _content_type=MERGE_PATCH)


def _input_data(kind: str, namespace: str, name: str, field: str) -> dict[str, Any]:
    """The data of the ConfigMap or Secret (``kind``) ``name``; ``InputMissing`` naming ``field`` when it is absent."""
    read = _core().read_namespaced_config_map if kind == "ConfigMap" else _core().read_namespaced_secret
    try:
        found = read(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            raise InputMissing(f"{field}: {kind} {namespace}/{name} not found") from exc
        raise
    return dict(found.data or {})


def configmap_text(namespace: str, name: str, key: str, field: str) -> str:
    """The text under ``key`` of ConfigMap ``name``; ``InputMissing`` naming ``field`` when either is absent."""
    data = _input_data("ConfigMap", namespace, name, field)
    if key not in data:
        raise InputMissing(f"{field}: ConfigMap {namespace}/{name} has no key {key!r} (keys: {sorted(data)})")
    return str(data[key])


def check_secret(namespace: str, name: str, keys: tuple[str, ...], field: str) -> None:
    """``InputMissing`` naming ``field`` unless Secret ``name`` exists and holds every key in ``keys``."""
    data = _input_data("Secret", namespace, name, field)
    missing = [k for k in keys if k not in data]
    if missing:
        raise InputMissing(f"{field}: Secret {namespace}/{name} has no key(s) {', '.join(missing)}")


def apply_configmap(namespace: str, body: dict[str, Any]) -> None:
    """Create the ConfigMap, or bring an existing one's data up to date (a retry after a crash finds it)."""
    try:
        _core().create_namespaced_config_map(namespace, cast(Any, body))
    except ApiException as exc:
        if exc.status != 409:
            raise
        _core().patch_namespaced_config_map(body["metadata"]["name"], namespace, {"data": body["data"]},
                                            _content_type=MERGE_PATCH)


def delete_configmap(namespace: str, name: str) -> None:
    try:
        _core().delete_namespaced_config_map(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise


def get_rayjob(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return cast(dict[str, Any], _custom().get_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, name))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def create_rayjob(namespace: str, body: dict[str, Any]) -> bool:
    """Create the RayJob; false when it already exists (an earlier pass created it). ``KubeRayMissing`` when the
    API answers 404 for the RayJob collection itself."""
    try:
        _custom().create_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, body)
    except ApiException as exc:
        if exc.status == 409:
            return False
        if exc.status == 404:
            raise KubeRayMissing(f"creating RayJob {namespace}/{body['metadata']['name']}: the API server does not "
                                 f"serve {RAY_GROUP}/{RAY_VERSION} {RAY_PLURAL}; install the KubeRay operator "
                                 "and its CRDs") from exc
        raise
    return True


def delete_rayjob(namespace: str, name: str) -> None:
    try:
        _custom().delete_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, name)
    except ApiException as exc:
        if exc.status != 404:
            raise


def rayjobs_of(namespace: str, job: str) -> list[str]:
    """Names of the RayJobs labelled as children of the CR ``job``."""
    try:
        found = _custom().list_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL,
                                                        label_selector=f"{LABEL_JOB}={job}")
    except ApiException as exc:
        if exc.status == 404:
            return []
        raise
    # The selector is also checked here: the label is what makes a RayJob ours, whatever the server filtered.
    items = cast(dict[str, Any], found).get("items", [])
    return [str(item["metadata"]["name"]) for item in items
            if item.get("metadata", {}).get("labels", {}).get(LABEL_JOB) == job]
