"""The ``DiffusionTrainingJob`` spec, checked and parsed into a typed ``Spec``.

The CRD's OpenAPI schema (helm/dlmoe/crds/) rejects malformed specs at admission, but the operator checks the same
rules again: a cluster may run with validation off, a CR may predate a schema change, and the emulator used in tests
validates nothing. Every error names the field path (``spec.workers.replicas``), so status and Events say exactly what
to fix. ``FIELDS`` mirrors the CRD; a unit test keeps the two in step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

QUANTITY_CPU = r"^[0-9]+(\.[0-9]+)?m?$"
QUANTITY_MEMORY = r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?)?$"
OVERRIDE = r"^[A-Za-z_][A-Za-z0-9_.]*=.*$"


@dataclass(frozen=True)
class Field:
    """One field of the spec: its JSON type (``str``, ``int``, ``number``, ``bool``, ``quantity``, ``object``,
    ``strings``, ``free`` for an object of any content) and the constraints the CRD puts on it."""

    kind: str
    required: bool = False
    minimum: float | None = None
    enum: tuple[str, ...] = ()
    pattern: str | None = None
    fields: Mapping[str, Field] = field(default_factory=dict)


def _resources(gpu: bool) -> Field:
    parts = {"cpu": Field("quantity", pattern=QUANTITY_CPU), "memory": Field("quantity", pattern=QUANTITY_MEMORY)}
    if gpu:
        parts["gpu"] = Field("int", minimum=0)
    return Field("object", fields=parts)


NON_EMPTY = Field("str", pattern=r".")
FIELDS: dict[str, Field] = {
    "job": Field("object", required=True, fields={
        "inline": Field("free"),
        "configMapRef": Field("object", fields={"name": Field("str", required=True, pattern=r"."), "key": NON_EMPTY}),
    }),
    "overrides": Field("strings", pattern=OVERRIDE),
    "image": Field("str", required=True, pattern=r"."),
    "imagePullPolicy": Field("str", enum=("Always", "IfNotPresent", "Never")),
    "workers": Field("object", required=True, fields={
        "replicas": Field("int", required=True, minimum=1), "resources": _resources(gpu=True)}),
    "head": Field("object", fields={"resources": _resources(gpu=False)}),
    "storage": Field("object", fields={
        "checkpointUri": NON_EMPTY, "s3Endpoint": NON_EMPTY,
        "credentialsSecret": Field("object", fields={
            "name": Field("str", required=True, pattern=r"."), "accessKeyIdKey": NON_EMPTY,
            "secretAccessKeyKey": NON_EMPTY}),
    }),
    "mlflow": Field("object", fields={"trackingUri": NON_EMPTY, "experiment": NON_EMPTY}),
    "restartPolicy": Field("object", fields={
        "maxRestarts": Field("int", minimum=0), "backoffSeconds": Field("int", minimum=0),
        "maxBackoffSeconds": Field("int", minimum=0)}),
    "progressDeadlineSeconds": Field("int", minimum=0),
    "suspend": Field("bool"),
    "export": Field("object", fields={
        "enabled": Field("bool"), "uri": NON_EMPTY, "everyNCheckpoints": Field("int", minimum=0),
        "register": NON_EMPTY}),
    "balancePolicy": Field("object", fields={
        "threshold": Field("number", minimum=1), "consecutiveReads": Field("int", minimum=1),
        "action": Field("str", enum=("Warn", "Suspend"))}),
}


class SpecError(ValueError):
    """A spec that breaks the CRD's rules; ``errors`` holds one ``path: problem`` line per broken rule."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def _check(value: Any, rule: Field, path: str, errors: list[str]) -> None:
    kind = rule.kind
    if kind in ("object", "free"):
        if not isinstance(value, dict):
            errors.append(f"{path}: must be an object, got {type(value).__name__}")
            return
        if kind == "free":
            return
        for name in value:
            if name not in rule.fields:
                errors.append(f"{path}.{name}: unknown field (known: {', '.join(sorted(rule.fields))})")
        for name, sub in rule.fields.items():
            if name in value:
                _check(value[name], sub, f"{path}.{name}", errors)
            elif sub.required:
                errors.append(f"{path}.{name}: required")
        return
    if kind == "strings":
        if not isinstance(value, list):
            errors.append(f"{path}: must be a list of strings, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _check(item, Field("str", pattern=rule.pattern), f"{path}[{i}]", errors)
        return
    if kind == "quantity" and isinstance(value, int) and not isinstance(value, bool):
        kind = "int"
        rule = Field("int", minimum=1)
    types: dict[str, type | tuple[type, ...]] = {"str": str, "quantity": str, "bool": bool, "int": int,
                                                 "number": (int, float)}
    expected = types[kind]
    if not isinstance(value, expected) or (kind != "bool" and isinstance(value, bool)):
        errors.append(f"{path}: must be {'a quantity' if kind == 'quantity' else 'of type ' + kind}, got {value!r}")
        return
    if rule.minimum is not None and cast(float, value) < rule.minimum:
        errors.append(f"{path}: must be at least {rule.minimum:g}, got {value!r}")
    if rule.enum and value not in rule.enum:
        errors.append(f"{path}: must be one of {', '.join(rule.enum)}, got {value!r}")
    if rule.pattern is not None and isinstance(value, str) and not re.search(rule.pattern, value):
        what = "must not be empty" if rule.pattern == r"." else f"must match {rule.pattern}"
        errors.append(f"{path}: {what}, got {value!r}")


def validate(spec: Any) -> list[str]:
    """Every rule of the CRD that ``spec`` breaks, as ``spec.<path>: <problem>`` lines (empty when valid)."""
    errors: list[str] = []
    _check(spec, Field("object", fields=FIELDS), "spec", errors)
    job = spec.get("job") if isinstance(spec, dict) else None
    if isinstance(job, dict) and ("inline" in job) == ("configMapRef" in job):
        errors.append("spec.job: exactly one of spec.job.inline and spec.job.configMapRef must be set")
    return errors


@dataclass(frozen=True)
class Spec:
    """A valid spec with the CRD's defaults filled in."""

    image: str
    pull_policy: str
    replicas: int
    worker_cpu: str
    worker_memory: str
    gpus: int
    head_cpu: str
    head_memory: str
    inline_job: dict[str, Any] | None
    job_configmap: tuple[str, str] | None
    overrides: tuple[str, ...]
    checkpoint_uri: str | None
    s3_endpoint: str | None
    credentials: tuple[str, str, str] | None
    mlflow_uri: str | None
    experiment: str | None
    max_restarts: int
    backoff_seconds: int
    max_backoff_seconds: int
    progress_deadline_seconds: int
    suspend: bool
    export: dict[str, Any]
    balance_threshold: float
    balance_reads: int
    balance_action: str


def parse(spec: Any) -> Spec:
    """``spec`` as a typed ``Spec``; ``SpecError`` naming every broken field when it is not valid."""
    errors = validate(spec)
    if errors:
        raise SpecError(errors)
    workers, head = spec["workers"].get("resources", {}), spec.get("head", {}).get("resources", {})
    storage, mlflow = spec.get("storage", {}), spec.get("mlflow", {})
    restart, balance = spec.get("restartPolicy", {}), spec.get("balancePolicy", {})
    ref = spec["job"].get("configMapRef")
    secret = storage.get("credentialsSecret")
    return Spec(
        image=spec["image"], pull_policy=spec.get("imagePullPolicy", "IfNotPresent"),
        replicas=spec["workers"]["replicas"],
        worker_cpu=str(workers.get("cpu", "2")), worker_memory=str(workers.get("memory", "8Gi")),
        gpus=workers.get("gpu", 0),
        head_cpu=str(head.get("cpu", "1")), head_memory=str(head.get("memory", "4Gi")),
        inline_job=spec["job"].get("inline"),
        job_configmap=(ref["name"], ref.get("key", "job.yaml")) if ref else None,
        overrides=tuple(spec.get("overrides", ())),
        checkpoint_uri=storage.get("checkpointUri"), s3_endpoint=storage.get("s3Endpoint"),
        credentials=(secret["name"], secret.get("accessKeyIdKey", "AWS_ACCESS_KEY_ID"),
                     secret.get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY")) if secret else None,
        mlflow_uri=mlflow.get("trackingUri"), experiment=mlflow.get("experiment"),
        max_restarts=restart.get("maxRestarts", 3), backoff_seconds=restart.get("backoffSeconds", 30),
        max_backoff_seconds=restart.get("maxBackoffSeconds", 900),
        progress_deadline_seconds=spec.get("progressDeadlineSeconds", 0),
        suspend=spec.get("suspend", False), export=dict(spec.get("export", {})),
        balance_threshold=float(balance.get("threshold", 4.0)), balance_reads=balance.get("consecutiveReads", 3),
        balance_action=balance.get("action", "Warn"),
    )
