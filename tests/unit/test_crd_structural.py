"""The chart's CRD as kube-apiserver would take it (tests/crd_schema.py): its schema is structural — a schema the
server would refuse fails here, each way of breaking it named by its path — and creating resources meets the schema's
validation with unknown fields refused (strict field validation), so the examples pass and each bad resource fails
naming its field. The value rules of every spec field are covered field by field in tests/unit/test_bad_inputs.py;
this adds what plain JSON Schema there cannot see: unknown fields, and the schema's own shape.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.crd_schema import admission_errors, structural_problems, unknown_fields

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "helm/dlmoe/crds/diffusiontrainingjobs.dlmoe.io.yaml"
EXAMPLES = sorted((ROOT / "jobs/examples").glob("*.yaml"))


def schema() -> dict[str, Any]:
    (version,) = yaml.safe_load(CRD.read_text())["spec"]["versions"]
    return copy.deepcopy(dict(version["schema"]["openAPIV3Schema"]))


def spec_node(root: dict[str, Any], *path: str) -> dict[str, Any]:
    node: dict[str, Any] = root["properties"]["spec"]
    for name in path:
        node = node["properties"][name]
    return node


def test_the_chart_crd_is_structural() -> None:
    assert structural_problems(schema()) == []


BREAKS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "untyped node": (lambda s: spec_node(s, "image").pop("type"),
                     "openAPIV3Schema.properties.spec.properties.image.type: must not be empty"),
    "additionalProperties beside properties": (
        lambda s: spec_node(s, "storage").update(additionalProperties={"type": "string"}),
        "openAPIV3Schema.properties.spec.properties.storage: additionalProperties and properties are mutually "
        "exclusive"),
    "type inside oneOf": (lambda s: spec_node(s, "job")["oneOf"][0].update(type="object"),
                          "openAPIV3Schema.properties.spec.properties.job.oneOf[0].type: must not be set inside"),
    "default inside anyOf": (lambda s: spec_node(s, "workers", "resources", "cpu")["anyOf"][1].update(default="1"),
                             "properties.cpu.anyOf[1].default: must not be set inside"),
    "field only inside a junctor": (
        lambda s: spec_node(s, "job")["oneOf"][0].update(properties={"extra": {"type": "string"}}),
        "openAPIV3Schema.properties.spec.properties.job.properties.extra: specified inside allOf/anyOf/oneOf/not"),
    "typed int-or-string": (lambda s: spec_node(s, "workers", "resources", "memory").update(type="string"),
                            "properties.memory.type: must be empty with x-kubernetes-int-or-string"),
    "preserve-unknown-fields on a string": (
        lambda s: spec_node(s, "image").update({"x-kubernetes-preserve-unknown-fields": True}),
        "properties.image.x-kubernetes-preserve-unknown-fields: only on an object node"),
    "list-type map without keys": (lambda s: spec_node(s, "overrides").update({"x-kubernetes-list-type": "map"}),
                                   "properties.overrides.x-kubernetes-list-map-keys: required"),
    "list-type on an object": (lambda s: spec_node(s, "mlflow").update({"x-kubernetes-list-type": "set"}),
                               "properties.mlflow.x-kubernetes-list-type: only on an array node"),
    "misspelt extension": (lambda s: spec_node(s, "job", "inline").update({"x-kubernetes-preserve-unknown": True}),
                           "properties.inline.x-kubernetes-preserve-unknown: not an extension Kubernetes knows"),
    "CEL rule without a rule": (lambda s: spec_node(s, "job")["x-kubernetes-validations"][0].pop("rule"),
                                "properties.job.x-kubernetes-validations[0].rule: required"),
    "metadata restricted beyond its name": (
        lambda s: s["properties"]["metadata"].update(properties={"labels": {"type": "object"}}),
        "openAPIV3Schema.properties.metadata.properties.labels: only metadata.name and metadata.generateName"),
    "$ref": (lambda s: spec_node(s, "head").update({"$ref": "#/definitions/head"}),
             "properties.head.$ref: must not be used"),
    "uniqueItems": (lambda s: spec_node(s, "overrides").update(uniqueItems=True),
                    "properties.overrides.uniqueItems: cannot be true"),
    "array without items": (lambda s: spec_node(s, "overrides").pop("items"),
                            "properties.overrides.items: an array node must specify its items"),
    "root not an object": (lambda s: s.update(type="array", items={"type": "string"}),
                           "openAPIV3Schema.type: must be object at the root"),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_a_crd_the_api_server_would_refuse_fails_naming_the_node(case: str) -> None:
    broken = schema()
    change, wanted = BREAKS[case]
    change(broken)
    problems = structural_problems(broken)
    assert any(wanted in p for p in problems), problems


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_examples_are_admitted_with_nothing_pruned(path: Path) -> None:
    body = yaml.safe_load(path.read_text())
    assert admission_errors(body, schema()) == []


def resource(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "dlmoe.io/v1alpha1", "kind": "DiffusionTrainingJob", "metadata": {"name": "bad"},
            "spec": {"job": {"inline": {"run_name": "x"}}, "image": "img:1", "workers": {"replicas": 2}, **spec}}


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "wrong type": (resource(workers={"replicas": "two"}), "spec.workers.replicas: 'two' is not of type 'integer'"),
    "missing required": (resource(storage={"credentialsSecret": {"accessKeyIdKey": "K"}}),
                         "spec.storage.credentialsSecret: 'name' is a required property"),
    "out of range": (resource(restartPolicy={"backoffSeconds": -1}),
                     "spec.restartPolicy.backoffSeconds: -1 is less than the minimum of 0"),
    "unknown spec field": (resource(replicas=2), 'spec.replicas: unknown field "spec.replicas"'),
    "unknown nested field": (resource(mlflow={"trackingURI": "http://m"}),
                             'spec.mlflow.trackingURI: unknown field "spec.mlflow.trackingURI"'),
    "unknown top-level field": ({**resource(), "sepc": {}}, 'sepc: unknown field "sepc"'),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_resource_is_refused_naming_the_field(case: str) -> None:
    body, wanted = BAD[case]
    errors = admission_errors(body, schema())
    assert wanted in errors, errors


def test_the_inline_job_and_metadata_keep_their_unknown_fields() -> None:
    body = resource(job={"inline": {"run_name": "x", "train": {"steps": 5, "anything": [1, 2]}}})
    body["metadata"]["labels"] = {"team": "a"}
    assert unknown_fields(body, schema(), "") == []
