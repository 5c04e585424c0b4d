"""The operator's pure parts: spec checks (errors name the field), the CRD's schema (examples pass, malformed specs
fail, the operator's checks mirror it), rendering of the ConfigMap and RayJob, the status maths and the MLflow
summary; and that importing the operator pulls in no torch, ray or deepspeed."""

from __future__ import annotations

import copy
import datetime
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from operators import render
from operators import status as st
from operators.progress import Metric, Reading, summarise
from operators.spec import FIELDS, Field, SpecError, parse, validate

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "helm/dlmoe/crds/diffusiontrainingjobs.dlmoe.io.yaml"
EXAMPLES = sorted((ROOT / "jobs/examples").glob("*.yaml"))
T0 = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    return dict(version["schema"]["openAPIV3Schema"])


def to_json_schema(node: Any) -> Any:
    """The structural schema as plain JSON Schema: Kubernetes' x-kubernetes-* extensions dropped (CEL rules are
    checked by the API server, and mirrored by the oneOf next to them)."""
    if isinstance(node, dict):
        return {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if isinstance(node, list):
        return [to_json_schema(v) for v in node]
    return node


SCHEMA = to_json_schema(crd_schema())


def schema_errors(body: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]


def minimal_spec(**extra: Any) -> dict[str, Any]:
    return {"job": {"inline": {"run_name": "x"}}, "image": "img:1", "workers": {"replicas": 2}, **extra}


# -- the CRD and the examples ----------------------------------------------------------------------------------------

def test_crd_names_columns_and_status_subresource() -> None:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["metadata"]["name"] == "diffusiontrainingjobs.dlmoe.io"
    assert crd["spec"]["names"]["shortNames"] == ["dtj"]
    assert crd["spec"]["scope"] == "Namespaced"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"].upper() for c in version["additionalPrinterColumns"]]
    assert columns == ["PHASE", "STEP", "LOSS", "BALANCE", "ATTEMPTS", "AGE"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_the_crd_schema_and_the_operator_checks(path: Path) -> None:
    body = yaml.safe_load(path.read_text())
    assert body["apiVersion"] == "dlmoe.io/v1alpha1" and body["kind"] == "DiffusionTrainingJob"
    assert schema_errors(body) == []
    assert validate(body["spec"]) == []


def test_examples_are_the_repo_jobs() -> None:
    assert {p.name for p in EXAMPLES} == {"debug-cpu.yaml", "llada-moe-7b-a1b-pretrain.yaml"}
    debug = yaml.safe_load((ROOT / "jobs/examples/debug-cpu.yaml").read_text())["spec"]
    assert debug["job"]["inline"] == yaml.safe_load((ROOT / "jobs/debug.yaml").read_text())
    assert debug["workers"]["replicas"] == 2 and debug["workers"]["resources"]["gpu"] == 0
    gpu = parse(yaml.safe_load((ROOT / "jobs/examples/llada-moe-7b-a1b-pretrain.yaml").read_text())["spec"])
    assert gpu.job_configmap == ("llada-moe-7b-a1b-pretrain", "job.yaml") and gpu.gpus == 8
    job = yaml.safe_load((ROOT / "jobs/llada-moe-7b-a1b-pretrain.yaml").read_text())
    # 8 worker pods of 8 GPUs are the job's 64 Ray Train workers.
    assert gpu.replicas * gpu.gpus == job["parallel"]["num_workers"]


@pytest.mark.parametrize(("change", "field"), [
    (lambda s: s["workers"].update(replicas=0), "workers.replicas"),
    (lambda s: s.pop("image"), "image"),
    (lambda s: s.update(imagePullPolicy="Sometimes"), "imagePullPolicy"),
    (lambda s: s["job"].update(configMapRef={"name": "cm"}), "job"),
    (lambda s: s.update(job={}), "job"),
    (lambda s: s.update(balancePolicy={"action": "Explode"}), "balancePolicy.action"),
    (lambda s: s.update(restartPolicy={"maxRestarts": -1}), "restartPolicy.maxRestarts"),
    (lambda s: s.update(overrides=["no-equals-sign"]), "overrides.0"),
    (lambda s: s["workers"].update(resources={"memory": "lots"}), "workers.resources.memory"),
    (lambda s: s.update(storage={"credentialsSecret": {"accessKeyIdKey": "K"}}), "storage.credentialsSecret"),
])
def test_schema_and_operator_both_reject_malformed_specs(change: Any, field: str) -> None:
    spec = minimal_spec()
    change(spec)
    errors = schema_errors({"apiVersion": "dlmoe.io/v1alpha1", "kind": "DiffusionTrainingJob", "spec": spec})
    # jsonschema reports a missing field at its parent ("spec: 'image' is a required property").
    parent, _, leaf = f"spec.{field}".rpartition(".")
    assert any(e.startswith(f"spec.{field}") or (e.startswith(f"{parent}:") and f"'{leaf}'" in e)
               for e in errors), errors
    problems = validate(spec)
    assert any(p.startswith(f"spec.{field.replace('.0', '[0]')}") for p in problems), problems


def schema_fields(node: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, sub in node.get("properties", {}).items():
        out.add(prefix + name)
        if sub.get("type") == "object" and "properties" in sub:
            out |= schema_fields(sub, f"{prefix}{name}.")
    return out


def operator_fields(fields: dict[str, Field] | Any, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, rule in fields.items():
        out.add(prefix + name)
        out |= operator_fields(rule.fields, f"{prefix}{name}.")
    return out


def test_operator_checks_mirror_every_crd_field() -> None:
    assert operator_fields(FIELDS) == schema_fields(crd_schema()["properties"]["spec"])


# -- spec checks -----------------------------------------------------------------------------------------------------

def test_spec_errors_name_every_bad_field() -> None:
    spec = minimal_spec(progressDeadlineSeconds="soon", typo=1)
    spec["workers"]["replicas"] = 0
    with pytest.raises(SpecError) as info:
        parse(spec)
    assert any(e.startswith("spec.workers.replicas: must be at least 1") for e in info.value.errors)
    assert any(e.startswith("spec.progressDeadlineSeconds: must be of type int") for e in info.value.errors)
    assert any(e.startswith("spec.typo: unknown field") for e in info.value.errors)
    assert validate("not a mapping") == ["spec: must be an object, got str"]


def test_parse_fills_the_crd_defaults() -> None:
    spec = parse(minimal_spec())
    assert (spec.max_restarts, spec.backoff_seconds, spec.max_backoff_seconds) == (3, 30, 900)
    assert (spec.balance_threshold, spec.balance_reads, spec.balance_action) == (4.0, 3, "Warn")
    assert spec.pull_policy == "IfNotPresent" and spec.gpus == 0 and spec.suspend is False
    assert spec.credentials is None and spec.job_configmap is None


# -- rendering -------------------------------------------------------------------------------------------------------

FULL = minimal_spec(
    overrides=["train.steps=50"], imagePullPolicy="Always",
    workers={"replicas": 3, "resources": {"cpu": 4, "memory": "16Gi", "gpu": 2}},
    storage={"checkpointUri": "s3://runs", "s3Endpoint": "http://minio:9000",
             "credentialsSecret": {"name": "s3", "accessKeyIdKey": "id", "secretAccessKeyKey": "key"}},
    mlflow={"experiment": "exp"}, export={"enabled": False, "everyNCheckpoints": 5})


def test_run_name_is_stable_per_uid() -> None:
    uid = "0b5c3c1e-1111-2222-3333-444455556666"
    assert render.run_name("job", uid) == render.run_name("job", uid) == "job-0b5c3c1e"
    assert render.run_name("job", "ffff" + uid[4:]) != render.run_name("job", uid)
    assert [render.rayjob_name("job", n) for n in (1, 2)] == ["job-a1", "job-a2"]


def test_rayjob_renders_resources_entrypoint_and_env() -> None:
    spec = parse(copy.deepcopy(FULL))
    body = render.render_rayjob("job", 2, "job-0b5c3c1e", spec, "http://mlflow:5000")
    assert body["apiVersion"] == "ray.io/v1" and body["metadata"]["name"] == "job-a2"
    assert body["metadata"]["labels"][render.LABEL_ATTEMPT] == "2"
    rj = body["spec"]
    assert rj["backoffLimit"] == 0 and rj["shutdownAfterJobFinishes"] is True
    argv = shlex.split(rj["entrypoint"])
    assert argv[:3] == ["dlmoe", "train", "/etc/dlmoe/job/job.yaml"]
    assert argv[3] == "run_name=job-0b5c3c1e"
    assert {"checkpoint.storage=s3://runs", "tracking.experiment=exp", "export.enabled=false",
            "export.every_n_checkpoints=5"} <= set(argv)
    assert argv.index("train.steps=50") > argv.index("checkpoint.storage=s3://runs"), "user overrides come last"
    (group,) = rj["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 2}
    assert worker["image"] == "img:1" and worker["imagePullPolicy"] == "Always"
    env = {e["name"]: e for e in worker["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "s3", "key": "id"}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "s3", "key": "key"}}
    (head,) = rj["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert rj["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    volume = rj["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"][0]
    assert volume["configMap"]["name"] == render.configmap_name("job")


def test_rayjob_without_secret_or_mlflow_has_no_such_env() -> None:
    body = render.render_rayjob("job", 1, "run", parse(minimal_spec()), None)
    env = body["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    assert {e["name"] for e in env} == {"PYTHONUNBUFFERED"}


def test_configmap_holds_the_job_yaml() -> None:
    spec = parse(minimal_spec())
    text = render.job_text(spec, None)
    cm = render.render_configmap("job", "run", text)
    assert cm["metadata"]["name"] == "job-job" and yaml.safe_load(cm["data"]["job.yaml"]) == {"run_name": "x"}
    referenced = parse(minimal_spec(job={"configMapRef": {"name": "cm"}}))
    assert render.job_text(referenced, "run_name: y\n") == "run_name: y\n"


def test_experiment_precedence() -> None:
    assert render.experiment(parse(minimal_spec(mlflow={"experiment": "a"})), {"tracking": {"experiment": "b"}}) == "a"
    assert render.experiment(parse(minimal_spec()), {"tracking": {"experiment": "b"}}) == "b"
    assert render.experiment(parse(minimal_spec()), {}) == "dlmoe"


# -- status maths ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("rayjob_status", "phase", "reason"), [
    (None, st.PENDING, "ClusterStarting"),
    ({"jobDeploymentStatus": "Initializing"}, st.PENDING, "ClusterStarting"),
    ({"jobStatus": "PENDING", "jobDeploymentStatus": "Running"}, st.RUNNING, "JobRunning"),
    ({"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}, st.RUNNING, "JobRunning"),
    ({"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"}, st.SUCCEEDED, "JobSucceeded"),
    ({"jobStatus": "FAILED", "jobDeploymentStatus": "Failed", "reason": "AppFailed"}, st.FAILED, "AppFailed"),
    ({"jobStatus": "STOPPED", "jobDeploymentStatus": "Complete"}, st.FAILED, "JobStopped"),
    ({"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}, st.FAILED, "DeadlineExceeded"),
    ({"jobStatus": "", "jobDeploymentStatus": "Complete"}, st.FAILED, "JobNotSucceeded"),
])
def test_rayjob_outcome(rayjob_status: dict[str, Any] | None, phase: str, reason: str) -> None:
    outcome = st.rayjob_outcome(rayjob_status)
    assert (outcome.phase, outcome.reason) == (phase, reason)


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [st.backoff_seconds(n, 10, 60) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]
    assert st.backoff_seconds(3, 0, 60) == 0


def test_restarts_left_counts_the_first_run_plus_max_restarts() -> None:
    assert [st.restarts_left(n, 2) for n in (1, 2, 3)] == [True, True, False]
    assert st.restarts_left(1, 0) is False


def test_condition_transition_time_moves_only_on_a_flip() -> None:
    first = st.set_condition([], "Ready", True, "A", "a", T0)
    later = T0 + datetime.timedelta(minutes=5)
    same = st.set_condition(first, "Ready", True, "B", "b", later)
    assert same[0]["lastTransitionTime"] == first[0]["lastTransitionTime"] and same[0]["reason"] == "B"
    flipped = st.set_condition(same, "Ready", False, "C", "c", later)
    assert flipped[0]["lastTransitionTime"] == st.stamp(later) and flipped[0]["status"] == "False"
    both = st.set_condition(flipped, "Another", True, "D", "d", later)
    assert [c["type"] for c in both] == ["Another", "Ready"]


def test_attempts_open_once_and_close_once() -> None:
    attempts = st.open_attempt([], 1, "job-a1", T0)
    assert st.open_attempt(attempts, 1, "job-a1", T0 + datetime.timedelta(1)) == attempts
    closed = st.close_attempt(attempts, 1, "Failed", "AppFailed", "boom", T0 + datetime.timedelta(seconds=5))
    again = st.close_attempt(closed, 1, "Suspended", "Suspended", "later", T0 + datetime.timedelta(seconds=9))
    assert again == closed and closed[0]["reason"] == "AppFailed" and closed[0]["result"] == "Failed"
    assert st.parse_stamp(closed[0]["endTime"]) - st.parse_stamp(closed[0]["startTime"]) == datetime.timedelta(
        seconds=5)


def test_progress_deadline() -> None:
    start = st.stamp(T0)
    assert not st.deadline_exceeded(0, start, None, T0 + datetime.timedelta(days=1))
    assert not st.deadline_exceeded(60, start, None, T0 + datetime.timedelta(seconds=59))
    assert st.deadline_exceeded(60, start, None, T0 + datetime.timedelta(seconds=61))
    advanced = st.stamp(T0 + datetime.timedelta(seconds=50))
    assert not st.deadline_exceeded(60, start, advanced, T0 + datetime.timedelta(seconds=100))
    # An advance before this attempt started does not extend it.
    early = st.stamp(T0 - datetime.timedelta(hours=1))
    assert st.deadline_exceeded(60, start, early, T0 + datetime.timedelta(seconds=61))


def test_balance_reads_count_once_per_step_and_reset() -> None:
    assert st.balance_reads({}, 3.0, 10, 2.0) == 1
    assert st.balance_reads({"readsOverThreshold": 1, "step": 10}, 3.0, 10, 2.0) == 1
    assert st.balance_reads({"readsOverThreshold": 1, "step": 10}, 3.0, 20, 2.0) == 2
    assert st.balance_reads({"readsOverThreshold": 2, "step": 20}, 1.5, 30, 2.0) == 0
    assert st.balance_reads({"readsOverThreshold": 2, "step": 20}, None, None, 2.0) == 2


def test_status_patch_sets_changes_and_deletes_dropped_keys() -> None:
    assert st.status_patch({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == {"b": 3, "c": 4}
    assert st.status_patch({"a": 1, "gone": 2}, {"a": 1}) == {"gone": None}
    assert st.status_patch({"a": [1]}, {"a": [1]}) == {}


def test_stamps_round_trip_to_the_microsecond() -> None:
    when = T0 + datetime.timedelta(microseconds=123456)
    assert st.parse_stamp(st.stamp(when)) == when and st.stamp(when).endswith("Z")


# -- MLflow summary --------------------------------------------------------------------------------------------------

def test_summarise_progress_and_balance() -> None:
    reading = Reading(found=True, metrics={
        "loss": Metric(2.5, 120), "tokens_per_s": Metric(900.0, 120), "lr": Metric(3e-4, 120),
        "checkpoint_step": Metric(100.0, 100), "export_step": Metric(100.0, 100),
        "moe/max_over_mean": Metric(1.8, 110), "moe/coefficient_of_variation": Metric(0.3, 110),
        "moe/normalized_entropy": Metric(0.97, 110), "moe/dead_experts": Metric(0.0, 110),
        "moe/layer0/max_over_mean": Metric(1.5, 110), "moe/layer3/max_over_mean": Metric(2.6, 110),
    })
    progress, balance = summarise(reading)
    assert progress == {"step": 120, "loss": 2.5, "tokensPerSecond": 900.0, "lr": 3e-4,
                        "latestCheckpointStep": 100, "lastExportStep": 100}
    assert balance["maxOverMean"] == 1.8 and balance["step"] == 110
    assert (balance["worstLayer"], balance["worstLayerMaxOverMean"]) == (3, 2.6)
    assert summarise(Reading(found=True)) == ({}, {})


# -- the import wall -------------------------------------------------------------------------------------------------

def test_operator_imports_no_torch_ray_or_deepspeed() -> None:
    code = ("import sys, operators.__main__, operators.handlers, operators.reconcile, operators.progress; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'deepspeed', 'dlmoe'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# -- the command line the chart runs ---------------------------------------------------------------------------------

def test_cli_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    from operators.__main__ import parse_args, resync_seconds

    args = parse_args(["--namespace", "a", "--namespace", "b", "--liveness", "http://0.0.0.0:8080/healthz"])
    assert (args.namespace, args.all_namespaces, args.liveness) == (["a", "b"], False, "http://0.0.0.0:8080/healthz")
    assert parse_args(["--all-namespaces"]).all_namespaces is True
    with pytest.raises(SystemExit):
        parse_args([])  # neither: the operator would not know what to watch
    with pytest.raises(SystemExit):
        parse_args(["--all-namespaces", "--namespace", "a"])
    monkeypatch.delenv("DLMOE_OPERATOR_RESYNC_SECONDS", raising=False)
    assert resync_seconds() == 30.0
    monkeypatch.setenv("DLMOE_OPERATOR_RESYNC_SECONDS", "soon")
    with pytest.raises(SystemExit, match="DLMOE_OPERATOR_RESYNC_SECONDS must be a number of seconds, got 'soon'"):
        resync_seconds()
