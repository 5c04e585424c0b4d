"""The Helm chart helm/dlmoe through the real helm binary: `helm lint --strict` and `helm template` for every
ci/*-values.yaml scenario, every rendered object validated against the Kubernetes JSON schemas, and the chart's
promises checked on the output: least-privilege RBAC scoped by mode, non-root pods, probes, and one MLflow URI
shared by the operator and the dashboard."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from data_pipeline.local_s3 import free_port, wait_until_listening
from dlmoe.cli import build_parser as build_dlmoe_parser
from operators.__main__ import parse_args as parse_operator_args

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "dlmoe"
SCENARIOS = {path.name.removesuffix("-values.yaml"): path for path in sorted((CHART / "ci").glob("*-values.yaml"))}
RELEASE, NAMESPACE = "dlmoe", "dlmoe-system"
# The Kubernetes minor whose schemas the output must satisfy: the client version of the helm that `make helm` pins.
KUBERNETES_VERSION = "1.35"
IN_CHART_MLFLOW_URI = f"http://dlmoe-mlflow.{NAMESPACE}.svc.cluster.local:5000"
EXTERNAL_MLFLOW_URI = "https://mlflow.example.com"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

OPERATOR_RULES = {
    ("dlmoe.io", "diffusiontrainingjobs"): {"get", "list", "watch", "patch", "update"},
    ("dlmoe.io", "diffusiontrainingjobs/status"): {"get", "patch", "update"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("", "secrets"): {"get"},
    ("ray.io", "rayjobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}

Manifest = dict[str, Any]


def find_helm() -> str:
    on_path = shutil.which("helm")
    if on_path:
        return on_path
    fetched = REPO / ".tools" / "helm"
    if os.access(fetched, os.X_OK):
        return str(fetched)
    pytest.fail(f"helm is neither on the PATH nor at {fetched}: run `make helm` (make test does) to fetch it")


@pytest.fixture(scope="module")
def helm() -> str:
    return find_helm()


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, check=False)


def template(helm: str, *args: str) -> list[Manifest]:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds", *args)
    assert result.returncode == 0, f"helm template {' '.join(args)} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(helm: str) -> dict[str, list[Manifest]]:
    return {name: template(helm, "-f", str(path)) for name, path in SCENARIOS.items()}


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def component(manifests: list[Manifest], name: str) -> list[Manifest]:
    return [m for m in manifests if m["metadata"].get("labels", {}).get("app.kubernetes.io/component") == name]


def deployment(manifests: list[Manifest], name: str) -> Manifest:
    (found,) = of_kind(component(manifests, name), "Deployment")
    return found


def only_container(dep: Manifest) -> Manifest:
    containers: list[Manifest] = dep["spec"]["template"]["spec"]["containers"]
    (container,) = containers
    return container


def env_value(container: Manifest, name: str) -> str:
    (value,) = [e["value"] for e in container.get("env", []) if e["name"] == name]
    return str(value)


def container_port(container: Manifest, port: int | str) -> int:
    """A probe's or Service's port, resolving a named port against the container's ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def pod_specs(manifests: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    for m in manifests:
        if m["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{m['kind']}/{m['metadata']['name']}", m["spec"]["template"]["spec"]


def test_the_scenarios_cover_both_modes_and_every_mlflow_and_dashboard_choice() -> None:
    assert {"default", "namespaced-mode", "cluster-mode", "external-mlflow", "dashboard-off", "grafana",
            "mlflow-persistence-off", "mlflow-existing-claim", "long-names"} <= set(SCENARIOS), sorted(SCENARIOS)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_lint_strict(helm: str, scenario: str) -> None:
    result = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(SCENARIOS[scenario]))
    assert result.returncode == 0, f"helm lint --strict with ci/{scenario}-values.yaml:\n{result.stdout}{result.stderr}"
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_object_is_valid_kubernetes(rendered: dict[str, list[Manifest]], scenario: str) -> None:
    """Strict schemas: a misspelt or misplaced field fails here instead of being dropped by the API server."""
    errors = []
    for m in rendered[scenario]:
        try:
            kubernetes_validate.validate(m, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{m['kind']}/{m['metadata'].get('name')} at {error.json_path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"{m['kind']}/{m['metadata'].get('name')}: {error}")
    assert not errors, f"ci/{scenario}-values.yaml renders invalid objects:\n" + "\n".join(errors)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_names_and_labels_fit_kubernetes_limits(rendered: dict[str, list[Manifest]], scenario: str) -> None:
    """The schemas do not check lengths; the API server refuses a Service name or label value over 63."""
    for m in rendered[scenario]:
        if m["kind"] != "CustomResourceDefinition":
            assert DNS_LABEL.match(m["metadata"]["name"]), f"ci/{scenario}-values.yaml: {m['kind']} {m['metadata']}"
        for key, value in m["metadata"].get("labels", {}).items():
            assert len(value) <= 63, f"ci/{scenario}-values.yaml: {m['kind']}/{m['metadata']['name']} label {key}"


def test_the_crd_is_rendered_and_structural(rendered: dict[str, list[Manifest]]) -> None:
    """Beyond the CRD object's own schema: the API server only accepts structural schemas, where every
    property states a type (or opts out explicitly)."""
    (crd,) = of_kind(rendered["default"], "CustomResourceDefinition")
    assert crd["spec"]["group"] == "dlmoe.io"
    assert crd["spec"]["names"]["kind"] == "DiffusionTrainingJob"
    assert "dtj" in crd["spec"]["names"]["shortNames"]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    assert version["served"] and version["storage"] and "status" in version["subresources"]

    untyped: list[str] = []

    def walk(schema: Manifest, path: str) -> None:
        opted_out = schema.get("x-kubernetes-int-or-string") or schema.get("x-kubernetes-preserve-unknown-fields")
        if "type" not in schema and not opted_out:
            untyped.append(path)
        for name, child in schema.get("properties", {}).items():
            walk(child, f"{path}.{name}")
        if isinstance(schema.get("items"), dict):
            walk(schema["items"], f"{path}[]")
        if isinstance(schema.get("additionalProperties"), dict):
            walk(schema["additionalProperties"], f"{path}{{}}")

    walk(version["schema"]["openAPIV3Schema"], "openAPIV3Schema")
    assert not untyped, f"properties without a type in the CRD schema: {untyped}"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rbac_is_exactly_what_the_operator_uses(rendered: dict[str, list[Manifest]], scenario: str) -> None:
    roles = of_kind(rendered[scenario], "Role") + of_kind(rendered[scenario], "ClusterRole")
    assert roles, f"ci/{scenario}-values.yaml renders no Role or ClusterRole"
    for role in roles:
        where = f"ci/{scenario}-values.yaml {role['kind']}/{role['metadata']['name']}"
        granted: dict[tuple[str, str], set[str]] = {}
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "nonResourceURLs", "resourceNames"):
                assert "*" not in rule.get(field, []), f"{where}: wildcard in {field}: {rule}"
            assert "nonResourceURLs" not in rule, f"{where}: {rule}"
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault((group, resource), set()).update(rule["verbs"])
        assert granted == OPERATOR_RULES, f"{where}: grants {granted}"


def bindings_subjects(bindings: list[Manifest]) -> set[tuple[str, str, str]]:
    return {(s["kind"], s["name"], s["namespace"]) for b in bindings for s in b["subjects"]}


def test_namespaced_mode_grants_a_role_in_each_watched_namespace(rendered: dict[str, list[Manifest]]) -> None:
    for scenario, namespaces in (("default", [NAMESPACE]), ("namespaced-mode", ["team-a", "team-b"])):
        manifests = rendered[scenario]
        assert not of_kind(manifests, "ClusterRole") and not of_kind(manifests, "ClusterRoleBinding"), scenario
        assert sorted(r["metadata"]["namespace"] for r in of_kind(manifests, "Role")) == sorted(namespaces)
        bindings = of_kind(manifests, "RoleBinding")
        assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(namespaces)
        for binding in bindings:
            assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                          "name": "dlmoe-operator"}
        operator = deployment(manifests, "operator")
        account = operator["spec"]["template"]["spec"]["serviceAccountName"]
        assert bindings_subjects(bindings) == {("ServiceAccount", account, NAMESPACE)}
        args = only_container(operator)["args"]
        assert "--all-namespaces" not in args
        assert [args[i + 1] for i, arg in enumerate(args) if arg == "--namespace"] == namespaces


def test_cluster_mode_grants_a_cluster_role_and_watches_all_namespaces(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["cluster-mode"]
    assert not of_kind(manifests, "Role") and not of_kind(manifests, "RoleBinding")
    (role,) = of_kind(manifests, "ClusterRole")
    (binding,) = of_kind(manifests, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    operator = deployment(manifests, "operator")
    account = operator["spec"]["template"]["spec"]["serviceAccountName"]
    assert bindings_subjects([binding]) == {("ServiceAccount", account, NAMESPACE)}
    args = only_container(operator)["args"]
    assert "--all-namespaces" in args and "--namespace" not in args


def test_cluster_mode_refuses_a_namespace_list(helm: str) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--set", "operator.watch.mode=cluster",
                      "--set", "operator.watch.namespaces={team-a}")
    assert result.returncode != 0
    assert "operator.watch.namespaces must be empty when operator.watch.mode is cluster" in result.stderr


def test_an_existing_service_account_is_bound_instead_of_created(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["mlflow-existing-claim"]
    assert not of_kind(manifests, "ServiceAccount")
    assert deployment(manifests, "operator")["spec"]["template"]["spec"]["serviceAccountName"] == "dlmoe-operator"
    assert bindings_subjects(of_kind(manifests, "RoleBinding")) == {("ServiceAccount", "dlmoe-operator", NAMESPACE)}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_pod_runs_non_root_with_a_read_only_root(rendered: dict[str, list[Manifest]], scenario: str) -> None:
    pods = list(pod_specs(rendered[scenario]))
    assert pods
    for name, pod in pods:
        where = f"ci/{scenario}-values.yaml {name}"
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        tmp_volumes = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context.get("privileged") is not True, where
            # A read-only root needs somewhere writable for Python's temporary files and caches.
            assert any(m["mountPath"] == "/tmp" and m["name"] in tmp_volumes for m in container["volumeMounts"]), where
            assert container["resources"]["requests"] and container["resources"]["limits"], where
            for probe in ("livenessProbe", "readinessProbe"):
                assert container[probe]["httpGet"]["path"], f"{where}: {probe}"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_service_reaches_a_pod_port(rendered: dict[str, list[Manifest]], scenario: str) -> None:
    manifests = rendered[scenario]
    for service in of_kind(manifests, "Service"):
        selector = service["spec"]["selector"]
        targets = [d for d in of_kind(manifests, "Deployment")
                   if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, f"Service/{service['metadata']['name']} selects {len(targets)} Deployments"
        for port in service["spec"]["ports"]:
            container_port(only_container(targets[0]), port["targetPort"])


def test_the_operator_deployment(rendered: dict[str, list[Manifest]]) -> None:
    operator = deployment(rendered["default"], "operator")
    assert operator["spec"]["replicas"] == 1
    assert operator["spec"]["strategy"] == {"type": "Recreate"}
    container = only_container(operator)
    assert container["image"] == "ghcr.io/dlmoe/dlmoe-operator:0.1.0"
    assert container["command"] == ["dlmoe-operator"]
    assert container["args"] == ["--namespace", NAMESPACE, "--liveness", "http://0.0.0.0:8080/healthz"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
        assert container_port(container, container[probe]["httpGet"]["port"]) == 8080
    assert env_value(container, "DLMOE_MLFLOW_TRACKING_URI") == IN_CHART_MLFLOW_URI
    assert env_value(container, "DLMOE_OPERATOR_RESYNC_SECONDS") == "30"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_operator_accepts_the_charts_command_line(rendered: dict[str, list[Manifest]], scenario: str) -> None:
    """The chart's args go through the operator's own parser, so a renamed flag fails here, not in a crash loop."""
    container = only_container(deployment(rendered[scenario], "operator"))
    args = parse_operator_args(container["args"])
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    roles = of_kind(rendered[scenario], "Role")
    assert args.all_namespaces == (not roles)
    assert sorted(args.namespace) == sorted(r["metadata"]["namespace"] for r in roles)


def test_the_in_chart_mlflow_server(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["default"]
    (service,) = [s for s in of_kind(manifests, "Service") if s["metadata"]["name"] == "dlmoe-mlflow"]
    assert [p["port"] for p in service["spec"]["ports"]] == [5000]
    server = deployment(manifests, "mlflow")
    container = only_container(server)
    assert container["command"] + container["args"][:10] == [
        "mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--workers", "1",
        "--backend-store-uri", "sqlite:////data/mlflow.db", "--artifacts-destination", "/data/artifacts"]
    allowed = container["args"][container["args"].index("--allowed-hosts") + 1].split(",")
    # The Host header training pods send through the Service's full name must pass MLflow's DNS-rebinding guard.
    assert f"dlmoe-mlflow.{NAMESPACE}.svc.cluster.local:*" in allowed and "localhost:*" in allowed
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
        assert container_port(container, container[probe]["httpGet"]["port"]) == 5000
    (claim,) = of_kind(manifests, "PersistentVolumeClaim")
    (data,) = [v for v in server["spec"]["template"]["spec"]["volumes"] if v["name"] == "data"]
    assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]


def request_status(port: int, path: str, host: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers={"Host": host})
        return connection.getresponse().status
    finally:
        connection.close()


def test_the_charts_mlflow_command_runs_and_admits_the_service_host(rendered: dict[str, list[Manifest]],
                                                                      tmp_path: Path) -> None:
    """The rendered command line, run by the real MLflow of this environment (the same 3.x as the chart's image),
    with only the pod's paths and port moved here: it must start, answer a training pod that calls it by the
    Service's full name, refuse an unknown Host (its DNS-rebinding guard) and keep /health open to the kubelet."""
    container = only_container(deployment(rendered["default"], "mlflow"))
    port = free_port()
    local = {"0.0.0.0": "127.0.0.1", "5000": str(port), "sqlite:////data/mlflow.db": f"sqlite:///{tmp_path}/mlflow.db",
             "/data/artifacts": str(tmp_path / "artifacts")}
    assert container["command"][0] == "mlflow"
    command = [sys.executable, "-m", "mlflow", *container["command"][1:], *(local.get(a, a) for a in container["args"])]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_listening(port, proc, "mlflow server", timeout=120)
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert request_status(port, search, f"dlmoe-mlflow.{NAMESPACE}.svc.cluster.local:5000") == 200
        assert request_status(port, search, "dlmoe-mlflow:5000") == 200
        assert request_status(port, search, "attacker.example.com") == 403
        assert request_status(port, "/health", "10.1.2.3:5000") == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_mlflow_without_persistence_uses_an_empty_dir(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["mlflow-persistence-off"]
    assert not of_kind(manifests, "PersistentVolumeClaim")
    (data,) = [v for v in deployment(manifests, "mlflow")["spec"]["template"]["spec"]["volumes"] if v["name"] == "data"]
    assert data == {"name": "data", "emptyDir": {}}


def test_mlflow_on_an_existing_claim_and_s3_artifacts(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["mlflow-existing-claim"]
    assert not of_kind(manifests, "PersistentVolumeClaim")
    server = deployment(manifests, "mlflow")
    (data,) = [v for v in server["spec"]["template"]["spec"]["volumes"] if v["name"] == "data"]
    assert data["persistentVolumeClaim"]["claimName"] == "mlflow-data"
    args = only_container(server)["args"]
    assert args[args.index("--artifacts-destination") + 1] == "s3://dlmoe-artifacts/mlflow"
    assert "mlflow.internal.example.com" in args[args.index("--allowed-hosts") + 1].split(",")
    assert server["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


def test_an_external_mlflow_replaces_the_server_everywhere(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["external-mlflow"]
    assert not component(manifests, "mlflow"), [f"{m['kind']}/{m['metadata']['name']}" for m in manifests]
    assert env_value(only_container(deployment(manifests, "operator")), "DLMOE_MLFLOW_TRACKING_URI") == (
        EXTERNAL_MLFLOW_URI)
    args = only_container(deployment(manifests, "dashboard"))["args"]
    assert args[args.index("--tracking-uri") + 1] == EXTERNAL_MLFLOW_URI


def test_the_dashboard_runs_against_the_charts_mlflow(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["default"]
    container = only_container(deployment(manifests, "dashboard"))
    assert container["image"] == "ghcr.io/dlmoe/dlmoe-training:0.1.0"
    assert container["command"] + container["args"] == [
        "dlmoe", "dashboard", "--tracking-uri", IN_CHART_MLFLOW_URI, "--host", "0.0.0.0", "--port", "8265"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
        assert container_port(container, container[probe]["httpGet"]["port"]) == 8265
    (service,) = [s for s in of_kind(manifests, "Service") if s["metadata"]["name"] == "dlmoe-dashboard"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8265 and container_port(container, port["targetPort"]) == 8265


def test_dlmoe_accepts_the_charts_dashboard_command(rendered: dict[str, list[Manifest]]) -> None:
    container = only_container(deployment(rendered["default"], "dashboard"))
    assert container["command"][0] == "dlmoe"
    args = build_dlmoe_parser().parse_args([*container["command"][1:], *container["args"]])
    assert (args.command, args.tracking_uri, args.host, args.port) == (
        "dashboard", IN_CHART_MLFLOW_URI, "0.0.0.0", 8265)


def test_the_dashboard_is_absent_when_disabled(rendered: dict[str, list[Manifest]]) -> None:
    assert component(rendered["default"], "dashboard")
    assert not component(rendered["dashboard-off"], "dashboard")


def test_prometheus_finds_the_dashboards_metrics_by_annotation(rendered: dict[str, list[Manifest]]) -> None:
    (service,) = [s for s in of_kind(rendered["default"], "Service") if s["metadata"]["name"] == "dlmoe-dashboard"]
    assert service["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics",
                                                  "prometheus.io/port": "8265"}
    assert not [m for m in of_kind(rendered["default"], "ConfigMap") if "grafana_dashboard" in m["metadata"]["labels"]]


def test_the_grafana_dashboard_queries_only_what_the_dashboard_serves(rendered: dict[str, list[Manifest]],
                                                                      tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from dlmoe.monitor.dashboard import Dashboard
    from dlmoe.monitor.store import Store
    from tests.synthetic_runs import imbalanced_counts, log_run

    (config_map,) = [m for m in of_kind(rendered["grafana"], "ConfigMap")
                     if m["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert config_map["metadata"]["namespace"] == "monitoring"
    board = json.loads(config_map["data"]["dlmoe-expert-load.json"])
    queried = {name for panel in board["panels"] for target in panel["targets"]
               for name in re.findall(r"\b(dlmoe_[a-z_]+)\b", target["expr"])}
    # What /metrics really serves, for a run that logged everything the gauges read.
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = log_run(uri, "served", imbalanced_counts())
    for key in ("val_loss", "tokens_per_s"):
        MlflowClient(tracking_uri=uri).log_metric(run_id, key, 1.0, step=30)
    _, _, body = Dashboard(Store(uri)).respond("/metrics")
    served = {family.name for family in text_string_to_metric_families(body.decode()) if family.samples}
    assert len(queried) >= 10 and queried <= served, queried - served


@pytest.mark.parametrize(("flag", "value", "named"), [
    ("--set-string", "mlflow.persistence.enabled=yes", "/mlflow/persistence/enabled"),
    ("--set", "dashboard.replicas=two", "/dashboard/replicas"),
    ("--set", "operator.watch.mode=everywhere", "/operator/watch/mode"),
    ("--set", "operator.watch.namespaces={Team_A}", "/operator/watch/namespaces/0"),
    ("--set", "mlflow.externalTrackingUri=mlflow.example.com", "/mlflow/externalTrackingUri"),
    ("--set", "mlflow.service.port=70000", "/mlflow/service/port"),
    ("--set", "securityContext.runAsNonRoot=false", "/securityContext/runAsNonRoot"),
    ("--set", "operator.replicas=2", "'replicas'"),
])
def test_the_values_schema_rejects_bad_values(helm: str, flag: str, value: str, named: str) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), flag, value)
    assert result.returncode != 0, f"{flag} {value} was accepted"
    assert named in result.stderr, result.stderr


def test_notes_say_how_to_submit_follow_and_watch_jobs(helm: str) -> None:
    def notes(*args: str) -> str:
        result = run_helm(helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", *args)
        assert result.returncode == 0, result.stderr
        return result.stdout.split("NOTES:", 1)[1]

    default = notes()
    assert "KubeRay" in default
    assert f"kubectl apply -n {NAMESPACE} -f jobs/examples/" in default
    assert f"kubectl get dtj -n {NAMESPACE}" in default
    assert f"kubectl port-forward -n {NAMESPACE} svc/dlmoe-dashboard 8265:8265" in default
    assert IN_CHART_MLFLOW_URI in default
    without_dashboard = notes("-f", str(SCENARIOS["dashboard-off"]))
    assert "svc/dlmoe-dashboard" not in without_dashboard
