"""A CustomResourceDefinition's ``openAPIV3Schema`` checked and applied the way kube-apiserver does, as far as the
tests need it (no real API server is obtainable on these machines).

``structural_problems`` refuses a schema that is not *structural* (Kubernetes documentation, "Specifying a structural
schema", and the apiextensions v1 validation of a CRD): every node typed (except ``x-kubernetes-int-or-string`` and
``x-kubernetes-preserve-unknown-fields`` nodes), no ``additionalProperties`` beside ``properties``, no ``type``,
``default``, ``description``, ``nullable`` or ``additionalProperties`` inside ``allOf``/``anyOf``/``oneOf``/``not``,
and no field inside them the schema does not also specify outside, ``metadata`` restricted to ``name`` and
``generateName``, none of the keywords apiextensions v1 forbids, and the ``x-kubernetes-*`` extensions where they
belong. ``admission_errors`` is what creating an object meets: the schema's value validations (jsonschema, with the
extensions read as the server reads them) and, under strict field validation (kubectl's default since 1.25), a
refusal of each unknown field the server would otherwise prune. Every message starts with the path it is about.
CEL rules (``x-kubernetes-validations``) are checked for shape only; their expressions are not evaluated.
"""

from __future__ import annotations

from typing import Any

import jsonschema

JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
NOT_IN_JUNCTORS = ("type", "default", "description", "nullable", "additionalProperties")
# apiextensions.k8s.io/v1 refuses these keywords (or these values of them) in a CRD's schema.
FORBIDDEN = {"$ref": "must not be used", "$schema": "must not be used", "id": "must not be used",
             "definitions": "must not be used", "patternProperties": "must not be used",
             "dependencies": "must not be used", "additionalItems": "must not be used"}
TYPES = ("object", "array", "string", "integer", "number", "boolean")
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]
METADATA_KEYS = ("name", "generateName")


def _branches(node: dict[str, Any], key: str) -> list[Any]:
    """The schemas under the junctor ``key`` of ``node`` (``not`` holds one, the others a list)."""
    if key not in node:
        return []
    return [node[key]] if key == "not" else list(node[key])


def _junctor_fields(node: dict[str, Any]) -> set[str]:
    """The property names the junctors of ``node`` (and theirs, recursively) specify."""
    found: set[str] = set()
    for key in JUNCTORS:
        for branch in _branches(node, key):
            if isinstance(branch, dict):
                found |= set(branch.get("properties", {})) | _junctor_fields(branch)
    return found


def _check_junctor(branch: dict[str, Any], path: str, int_or_string: bool, problems: list[str]) -> None:
    for key in NOT_IN_JUNCTORS:
        # The one exception: the anyOf of an int-or-string node names its two types.
        if key in branch and not (int_or_string and key == "type"):
            problems.append(f"{path}.{key}: must not be set inside allOf/anyOf/oneOf/not")
    for key in JUNCTORS:
        for i, inner in enumerate(_branches(branch, key)):
            _check_junctor(inner, f"{path}.{key}[{i}]", int_or_string, problems)


def _check_node(node: Any, path: str, problems: list[str], root: bool = False) -> None:
    if not isinstance(node, dict):
        problems.append(f"{path}: must be a schema object, got {type(node).__name__}")
        return
    kind = node.get("type")
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    for key, why in FORBIDDEN.items():
        if key in node:
            problems.append(f"{path}.{key}: {why} in a CustomResourceDefinition")
    if node.get("uniqueItems") is True:
        problems.append(f"{path}.uniqueItems: cannot be true in a CustomResourceDefinition "
                        f"(x-kubernetes-list-type: set says it)")
    if kind is not None and kind not in TYPES:
        problems.append(f"{path}.type: must be one of {', '.join(TYPES)}, got {kind!r}")
    if int_or_string:
        if kind is not None:
            problems.append(f"{path}.type: must be empty with x-kubernetes-int-or-string")
        if "anyOf" in node and node["anyOf"] != INT_OR_STRING:
            problems.append(f"{path}.anyOf: with x-kubernetes-int-or-string must be {INT_OR_STRING}")
    elif kind is None and not preserve:
        problems.append(f"{path}.type: must not be empty (a structural schema types every node)")
    if preserve and kind not in (None, "object"):
        problems.append(f"{path}.x-kubernetes-preserve-unknown-fields: only on an object node, not type {kind!r}")
    if root and kind != "object":
        problems.append(f"{path}.type: must be object at the root")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: additionalProperties and properties are mutually exclusive")
    if ("properties" in node or "additionalProperties" in node) and kind not in (None, "object"):
        problems.append(f"{path}: properties on a node of type {kind!r}")
    if "items" in node and kind != "array":
        problems.append(f"{path}.items: only on a node of type array")
    if kind == "array" and not isinstance(node.get("items"), dict):
        problems.append(f"{path}.items: an array node must specify its items with one schema")
    _check_extensions(node, path, kind, problems)
    for key in JUNCTORS:
        for i, branch in enumerate(_branches(node, key)):
            _check_junctor(branch, f"{path}.{key}[{i}]", int_or_string, problems)
    for name in sorted(_junctor_fields(node) - set(node.get("properties", {}))):
        problems.append(f"{path}.properties.{name}: specified inside allOf/anyOf/oneOf/not but not outside them")
    for name, child in node.get("properties", {}).items():
        child_path = f"{path}.properties.{name}"
        if root and name == "metadata" and isinstance(child, dict):
            extra = sorted(set(child) - {"type", "description", "properties"})
            extra += [f"properties.{k}" for k in sorted(set(child.get("properties", {})) - set(METADATA_KEYS))]
            for key in extra:
                problems.append(f"{child_path}.{key}: only metadata.name and metadata.generateName may be restricted")
        _check_node(child, child_path, problems)
    if isinstance(node.get("additionalProperties"), dict):
        _check_node(node["additionalProperties"], f"{path}.additionalProperties", problems)
    if isinstance(node.get("items"), dict):
        _check_node(node["items"], f"{path}.items", problems)
    if "default" in node and root:
        problems.append(f"{path}.default: not allowed at the root")


def _check_extensions(node: dict[str, Any], path: str, kind: str | None, problems: list[str]) -> None:
    list_type = node.get("x-kubernetes-list-type")
    if list_type is not None:
        if kind != "array":
            problems.append(f"{path}.x-kubernetes-list-type: only on an array node")
        elif list_type not in ("atomic", "set", "map"):
            problems.append(f"{path}.x-kubernetes-list-type: must be atomic, set or map, got {list_type!r}")
        elif list_type == "map":
            keys = node.get("x-kubernetes-list-map-keys") or []
            item = node.get("items", {})
            if not keys:
                problems.append(f"{path}.x-kubernetes-list-map-keys: required with x-kubernetes-list-type map")
            if item.get("type") != "object":
                problems.append(f"{path}.items.type: must be object with x-kubernetes-list-type map")
            for key in keys:
                field = item.get("properties", {}).get(key)
                if field is None:
                    problems.append(f"{path}.x-kubernetes-list-map-keys: {key!r} is not a property of the items")
                elif key not in item.get("required", []) and "default" not in field:
                    problems.append(f"{path}.x-kubernetes-list-map-keys: {key!r} must be required or defaulted")
        elif list_type == "set" and node.get("items", {}).get("type") in ("object", "array"):
            problems.append(f"{path}.x-kubernetes-list-type: set needs scalar items")
    if "x-kubernetes-list-map-keys" in node and list_type != "map":
        problems.append(f"{path}.x-kubernetes-list-map-keys: only with x-kubernetes-list-type map")
    map_type = node.get("x-kubernetes-map-type")
    if map_type is not None and (kind != "object" or map_type not in ("granular", "atomic")):
        problems.append(f"{path}.x-kubernetes-map-type: granular or atomic, on an object node only")
    if node.get("x-kubernetes-embedded-resource") is True:
        if kind != "object":
            problems.append(f"{path}.x-kubernetes-embedded-resource: only on an object node")
        elif not node.get("x-kubernetes-preserve-unknown-fields") and not \
                {"apiVersion", "kind", "metadata"} <= set(node.get("properties", {})):
            problems.append(f"{path}.x-kubernetes-embedded-resource: needs apiVersion, kind and metadata properties "
                            f"or x-kubernetes-preserve-unknown-fields")
    for i, rule in enumerate(node.get("x-kubernetes-validations", [])):
        if not isinstance(rule, dict) or not isinstance(rule.get("rule"), str) or not rule["rule"].strip():
            problems.append(f"{path}.x-kubernetes-validations[{i}].rule: required (a CEL expression)")
    for key in node:
        if key.startswith("x-kubernetes-") and key not in EXTENSIONS:
            problems.append(f"{path}.{key}: not an extension Kubernetes knows")


EXTENSIONS = ("x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "x-kubernetes-embedded-resource",
              "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
              "x-kubernetes-validations")


def structural_problems(schema: dict[str, Any]) -> list[str]:
    """Why kube-apiserver would refuse ``schema`` as a CRD version's ``openAPIV3Schema`` (empty when it would not)."""
    problems: list[str] = []
    _check_node(schema, "openAPIV3Schema", problems, root=True)
    return problems


def unknown_fields(value: Any, node: dict[str, Any], path: str) -> list[str]:
    """The fields of ``value`` that pruning would drop: not in ``properties`` of an object node that neither
    preserves unknown fields nor has ``additionalProperties``. ``metadata`` and embedded resources keep theirs."""
    if isinstance(value, dict) and node.get("type") == "object":
        if node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-embedded-resource"):
            return []
        if isinstance(node.get("additionalProperties"), dict):
            return [p for k, v in value.items() for p in unknown_fields(v, node["additionalProperties"], f"{path}.{k}")]
        known = node.get("properties", {})
        found = []
        for key, child in value.items():
            where = f"{path}.{key}" if path else key
            if key not in known:
                found.append(f'{where}: unknown field "{where}"')
            elif not (path == "" and key == "metadata"):
                found.extend(unknown_fields(child, known[key], where))
        return found
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [p for i, v in enumerate(value) for p in unknown_fields(v, node["items"], f"{path}[{i}]")]
    return []


def _json_schema(node: Any) -> Any:
    """The schema as jsonschema reads it: the extensions are the server's to interpret (done around this)."""
    if isinstance(node, dict):
        return {k: _json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if isinstance(node, list):
        return [_json_schema(v) for v in node]
    return node


def admission_errors(body: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """What creating ``body`` meets under ``schema`` with strict field validation, one ``path: problem`` each."""
    validator = jsonschema.Draft7Validator(_json_schema(schema))
    errors = [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
              for e in validator.iter_errors(body)]
    return errors + unknown_fields(body, schema, "")
