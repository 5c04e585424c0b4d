"""The real operator (kopf + the kubernetes client, built as ``dlmoe-operator`` builds it) against kmock's Kubernetes
emulator over HTTP, and a real MLflow server for progress. The tests play KubeRay's part by writing RayJob statuses,
and the user's by creating, patching and deleting DiffusionTrainingJobs. Most tests share one operator watching one
namespace, each with its own job names (an operator takes seconds to start and stop on a busy machine); the tests of
restarts, discovery and the operator's default MLflow URI run their own. Every wait polls with a timeout.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from data_pipeline.local_s3 import free_port
from operators.progress import CLIENT_SETTINGS
from operators.status import parse_stamp
from tests.integration.operator_harness import Cluster, emulator, running_operator, wait_for, write_kubeconfig

ROOT = Path(__file__).resolve().parents[2]
DEBUG_JOB = yaml.safe_load((ROOT / "jobs/debug.yaml").read_text())
GROUP, VERSION, PLURAL = "dlmoe.io", "v1alpha1", "diffusiontrainingjobs"


class Kube:
    """The test's side of the API: the user's and KubeRay's calls, through the same client library."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.custom, self.core, self.ns = client.CustomObjectsApi(api), client.CoreV1Api(api), namespace

    def create_job(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DiffusionTrainingJob",
                "metadata": {"name": name, "namespace": self.ns}, "spec": spec}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)
        created = self.job(name)
        assert created is not None, f"DiffusionTrainingJob {self.ns}/{name} was not created"
        return created

    def job(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def status(self, name: str) -> dict[str, Any]:
        found = self.job(name)
        assert found is not None, f"DiffusionTrainingJob {self.ns}/{name} is gone"
        return dict(found.get("status") or {})

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == kind), {})

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec},
                                                   _content_type="application/merge-patch+json")

    def rayjobs(self, job: str) -> dict[str, dict[str, Any]]:
        """The RayJobs of the DiffusionTrainingJob ``job``, by name."""
        found = self.custom.list_namespaced_custom_object("ray.io", "v1", self.ns, "rayjobs")
        return {item["metadata"]["name"]: item for item in found["items"]
                if item["metadata"].get("labels", {}).get("dlmoe.io/job") == job}

    def set_rayjob_status(self, name: str, **status: str) -> None:
        self.custom.patch_namespaced_custom_object_status("ray.io", "v1", self.ns, "rayjobs", name,
                                                          {"status": status},
                                                          _content_type="application/merge-patch+json")

    def configmaps(self) -> dict[str, dict[str, str]]:
        return {cm.metadata.name: dict(cm.data or {}) for cm in self.core.list_namespaced_config_map(self.ns).items}

    def events(self, job: str) -> list[tuple[str, str, str]]:
        """``(type, reason, message)`` of the Events about the DiffusionTrainingJob ``job``."""
        return [(e.type, e.reason, e.message) for e in self.core.list_namespaced_event(self.ns).items
                if e.involved_object.name == job and e.involved_object.kind == "DiffusionTrainingJob"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, client.ApiClient]]:
    with emulator() as (url, found):
        kubeconfig = write_kubeconfig(url, tmp_path_factory.mktemp("kube") / "config")
        # The MLflow client settings `dlmoe-operator` sets for itself, for this module only.
        settings = {"KUBECONFIG": str(kubeconfig), **CLIENT_SETTINGS}
        previous = {key: os.environ.get(key) for key in settings}
        os.environ.update(settings)
        try:
            yield found, config.new_client_from_config(config_file=str(kubeconfig))
        finally:
            for key, value in previous.items():
                if value is None:
                    os.environ.pop(key)
                else:
                    os.environ[key] = value


@pytest.fixture
def kube(cluster: tuple[Cluster, client.ApiClient]) -> Kube:
    """A fresh namespace, for a test that runs its own operator."""
    return Kube(cluster[1], f"t-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def shared_operator(cluster: tuple[Cluster, client.ApiClient]) -> Iterator[Kube]:
    """A namespace watched by one operator for the whole module (no default MLflow URI)."""
    kube = Kube(cluster[1], f"shared-{uuid.uuid4().hex[:8]}")
    with running_operator(kube.ns, None):
        yield kube


@pytest.fixture
def shared(shared_operator: Kube) -> Iterator[Kube]:
    """The shared operator's namespace; the test's jobs are deleted after it, or the operator would go on
    reconciling them (and reading MLflow) through the rest of the module."""
    yield shared_operator

    def jobs() -> list[str]:
        found = shared_operator.custom.list_namespaced_custom_object(GROUP, VERSION, shared_operator.ns, PLURAL)
        return [item["metadata"]["name"] for item in found["items"]]

    for name in jobs():
        shared_operator.custom.delete_namespaced_custom_object(GROUP, VERSION, shared_operator.ns, PLURAL, name)
    wait_for(lambda: not jobs(), "the test's jobs to be deleted", timeout=30)


def spec(**extra: Any) -> dict[str, Any]:
    return {"job": {"inline": DEBUG_JOB}, "image": "dlmoe-training:test", "workers": {"replicas": 2}, **extra}


def wait_phase(kube: Kube, name: str, phase: str, timeout: float = 20.0) -> dict[str, Any]:
    return dict(wait_for(lambda: (s := kube.status(name)).get("phase") == phase and s,
                         f"phase {phase} of {name}", timeout))


def test_create_renders_configmap_and_rayjob(shared: Kube) -> None:
    kube = shared
    kube.core.create_namespaced_secret(kube.ns, client.V1Secret(
        metadata=client.V1ObjectMeta(name="debug-s3"), data={"id": "QUtJQQ==", "key": "c2VjcmV0"}))
    created = kube.create_job("debug", spec(
        overrides=["train.steps=20"], workers={"replicas": 2, "resources": {"cpu": 1, "memory": "2Gi"}},
        storage={"s3Endpoint": "http://minio:9000",
                 "credentialsSecret": {"name": "debug-s3", "accessKeyIdKey": "id", "secretAccessKeyKey": "key"}},
        mlflow={"trackingUri": "http://mlflow:5000"}))
    rayjob = wait_for(lambda: kube.rayjobs("debug").get("debug-a1"), "RayJob debug-a1")
    status = wait_phase(kube, "debug", "Pending")
    uid = created["metadata"]["uid"]
    run = f"debug-{uid.replace('-', '')[:8]}"
    assert status["runName"] == run and status["attempt"] == 1 and status["rayJob"] == "debug-a1"
    assert [a["number"] for a in status["attempts"]] == [1]
    configmap = kube.configmaps()["debug-job"]
    assert yaml.safe_load(configmap["job.yaml"]) == DEBUG_JOB
    owner = rayjob["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("DiffusionTrainingJob", "debug",
                                                                                 uid, True)
    cm_owner = kube.core.read_namespaced_config_map("debug-job", kube.ns).metadata.owner_references[0]
    assert cm_owner.uid == uid
    rj = rayjob["spec"]
    assert rj["entrypoint"].split()[:4] == ["dlmoe", "train", "/etc/dlmoe/job/job.yaml", f"run_name={run}"]
    assert "train.steps=20" in rj["entrypoint"]
    assert rj["backoffLimit"] == 0 and rj["shutdownAfterJobFinishes"] is True
    (group,) = rj["rayClusterSpec"]["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    assert group["replicas"] == 2 and worker["resources"]["limits"] == {"cpu": "1", "memory": "2Gi"}
    env = {e["name"]: e for e in worker["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "debug-s3", "key": "id"}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
    wait_for(lambda: any(reason == "AttemptStarted" for _, reason, _ in kube.events("debug")), "AttemptStarted")


def test_failed_attempt_is_retried_after_backoff_with_the_same_run_then_succeeds(shared: Kube) -> None:
    kube = shared
    kube.create_job("retry", spec(restartPolicy={"maxRestarts": 2, "backoffSeconds": 1}))
    first = wait_for(lambda: kube.rayjobs("retry").get("retry-a1"), "RayJob retry-a1")
    kube.set_rayjob_status("retry-a1", jobStatus="RUNNING", jobDeploymentStatus="Running")
    wait_phase(kube, "retry", "Running")
    kube.set_rayjob_status("retry-a1", jobStatus="FAILED", jobDeploymentStatus="Failed", reason="AppFailed",
                           message="worker 1 died")
    restarting = wait_phase(kube, "retry", "Restarting")
    second = wait_for(lambda: kube.rayjobs("retry").get("retry-a2"), "RayJob retry-a2")
    assert "retry-a1" not in kube.rayjobs("retry"), "the failed attempt's RayJob is removed before the next"
    kube.set_rayjob_status("retry-a2", jobStatus="SUCCEEDED", jobDeploymentStatus="Complete")
    done = wait_phase(kube, "retry", "Succeeded")
    run = done["runName"]
    assert first["spec"]["entrypoint"] == second["spec"]["entrypoint"]
    assert f"run_name={run}" in first["spec"]["entrypoint"]
    assert "attempt 2 in 1s" in restarting["message"]
    one, two = done["attempts"]
    assert (one["number"], one["result"], one["reason"], one["message"]) == (1, "Failed", "AppFailed",
                                                                             "worker 1 died")
    assert (two["number"], two["result"]) == (2, "Succeeded")
    waited = (parse_stamp(two["startTime"]) - parse_stamp(one["endTime"])).total_seconds()
    assert waited >= 1.0, f"attempt 2 started {waited:.2f}s after attempt 1 ended; the backoff is 1s"
    assert done["attempt"] == 2 and "nextAttemptTime" not in done
    assert next(c for c in done["conditions"] if c["type"] == "Complete")["status"] == "True"
    wanted = {"AttemptStarted", "AttemptRunning", "AppFailed", "Succeeded"}
    wait_for(lambda: wanted <= {reason for _, reason, _ in kube.events("retry")}, f"Events {sorted(wanted)}")


def test_restart_limit_fails_the_job(shared: Kube) -> None:
    kube = shared
    kube.create_job("limit", spec(restartPolicy={"maxRestarts": 0}))
    wait_for(lambda: kube.rayjobs("limit").get("limit-a1"), "RayJob limit-a1")
    kube.set_rayjob_status("limit-a1", jobStatus="FAILED", jobDeploymentStatus="Failed")
    failed = wait_phase(kube, "limit", "Failed")
    assert "restartPolicy.maxRestarts=0" in failed["message"]
    # The pass that records Failed is the one that would have created attempt 2.
    assert list(kube.rayjobs("limit")) == ["limit-a1"] and failed["attempts"][0]["result"] == "Failed"
    wait_for(lambda: ("Warning", "RestartLimitExceeded") in {(t, r) for t, r, _ in kube.events("limit")},
             "a RestartLimitExceeded warning")


def test_invalid_spec_fails_naming_the_field_and_creates_nothing(shared: Kube) -> None:
    kube = shared
    kube.create_job("bad", spec(workers={"replicas": 0}, balancePolicy={"action": "Explode"}))
    failed = wait_phase(kube, "bad", "Failed")
    assert "spec.workers.replicas: must be at least 1" in failed["message"]
    assert "spec.balancePolicy.action: must be one of Warn, Suspend" in failed["message"]
    # The pass that records Failed returns before any child is created.
    assert kube.rayjobs("bad") == {} and "bad-job" not in kube.configmaps()
    wait_for(lambda: any(t == "Warning" and r == "InvalidSpec" and "spec.workers.replicas" in m
                         for t, r, m in kube.events("bad")), "an InvalidSpec warning naming the field")
    # Fixing the spec starts the job.
    kube.patch_spec("bad", {"workers": {"replicas": 1}, "balancePolicy": {"action": "Warn"}})
    wait_for(lambda: kube.rayjobs("bad").get("bad-a1"), "RayJob bad-a1 after the fix")
    wait_for(lambda: kube.condition("bad", "Validated").get("status") == "True", "Validated after the fix")


def test_spec_broken_while_running_stops_the_attempt_and_the_fix_resumes_the_run(shared: Kube) -> None:
    kube = shared
    kube.create_job("edit", spec())
    wait_for(lambda: kube.rayjobs("edit").get("edit-a1"), "RayJob edit-a1")
    kube.set_rayjob_status("edit-a1", jobStatus="RUNNING", jobDeploymentStatus="Running")
    running = wait_phase(kube, "edit", "Running")
    kube.patch_spec("edit", {"image": ""})
    failed = wait_phase(kube, "edit", "Failed")
    assert "spec.image: must not be empty" in failed["message"]
    assert kube.rayjobs("edit") == {}, "the attempt of a spec that turned invalid is stopped"
    assert (failed["attempts"][0]["result"], failed["attempts"][0]["reason"]) == ("Failed", "InvalidSpec")
    kube.patch_spec("edit", {"image": "dlmoe-training:fixed"})
    second = wait_for(lambda: kube.rayjobs("edit").get("edit-a2"), "RayJob edit-a2 after the fix")
    assert list(kube.rayjobs("edit")) == ["edit-a2"]
    assert f"run_name={running['runName']}" in second["spec"]["entrypoint"]
    worker = second["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["image"] == "dlmoe-training:fixed"


def test_missing_configmap_and_secret_are_waited_for(shared: Kube) -> None:
    kube = shared
    kube.create_job("refs", spec(job={"configMapRef": {"name": "refs-source", "key": "pretrain.yaml"}},
                                 storage={"credentialsSecret": {"name": "refs-s3"}}))
    missing = wait_for(lambda: kube.condition("refs", "InputsAvailable").get("reason") == "ConfigMapMissing"
                       and kube.condition("refs", "InputsAvailable"), "ConfigMapMissing")
    assert missing["message"] == f"spec.job.configMapRef: ConfigMap {kube.ns}/refs-source not found"
    text = (ROOT / "jobs/llada-moe-7b-a1b-pretrain.yaml").read_text()
    kube.core.create_namespaced_config_map(kube.ns, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="refs-source"), data={"pretrain.yaml": text}))
    secret = wait_for(lambda: kube.condition("refs", "InputsAvailable").get("reason") == "SecretMissing"
                      and kube.condition("refs", "InputsAvailable"), "SecretMissing")
    assert secret["message"] == f"spec.storage.credentialsSecret: Secret {kube.ns}/refs-s3 not found"
    assert kube.rayjobs("refs") == {}
    kube.core.create_namespaced_secret(kube.ns, client.V1Secret(
        metadata=client.V1ObjectMeta(name="refs-s3"),
        data={"AWS_ACCESS_KEY_ID": "QQ==", "AWS_SECRET_ACCESS_KEY": "Qg=="}))
    wait_for(lambda: kube.rayjobs("refs").get("refs-a1"), "RayJob refs-a1 once both exist")
    assert kube.configmaps()["refs-job"]["job.yaml"] == text


def test_suspend_deletes_the_rayjob_and_resume_continues_the_run(shared: Kube) -> None:
    kube = shared
    kube.create_job("pause", spec())
    first = wait_for(lambda: kube.rayjobs("pause").get("pause-a1"), "RayJob pause-a1")
    kube.patch_spec("pause", {"suspend": True})
    suspended = wait_phase(kube, "pause", "Suspended")
    wait_for(lambda: "pause-a1" not in kube.rayjobs("pause"), "RayJob pause-a1 deleted")
    kube.patch_spec("pause", {"suspend": False})
    second = wait_for(lambda: kube.rayjobs("pause").get("pause-a2"), "RayJob pause-a2 on resume")
    resumed = wait_phase(kube, "pause", "Pending")
    assert suspended["attempts"][0]["result"] == "Suspended"
    assert resumed["runName"] == suspended["runName"]
    assert first["spec"]["entrypoint"] == second["spec"]["entrypoint"]
    assert next(c for c in resumed["conditions"] if c["type"] == "Suspended")["status"] == "False"


def test_delete_removes_the_children(shared: Kube) -> None:
    kube = shared
    kube.create_job("gone", spec())
    wait_for(lambda: kube.rayjobs("gone").get("gone-a1"), "RayJob gone-a1")
    wait_for(lambda: "gone-job" in kube.configmaps(), "ConfigMap gone-job")
    wait_for(lambda: (kube.job("gone") or {}).get("metadata", {}).get("finalizers"), "the finalizer")
    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, kube.ns, PLURAL, "gone")
    wait_for(lambda: kube.job("gone") is None, "the CR to be deleted")
    assert kube.rayjobs("gone") == {} and "gone-job" not in kube.configmaps()


def log(mlflow: Any, run_id: str, step: int, **metrics: float) -> None:
    """Log ``metrics`` at ``step``; ``__`` in a name stands for ``/`` (``moe__max_over_mean``)."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    mlflow.log_batch(run_id, metrics=[Metric(k.replace("__", "/"), v, stamp, step) for k, v in metrics.items()])


def mlflow_run(uri: str, experiment: str, run: str) -> tuple[Any, str]:
    """The run dlmoe's tracker would open: tagged with the run name, in the job's experiment."""
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(tracking_uri=uri)
    experiment_id = mlflow.create_experiment(experiment)
    created = mlflow.create_run(experiment_id, run_name=run, tags={"dlmoe.run_name": run})
    return mlflow, str(created.info.run_id)


def test_progress_and_expert_imbalance_from_mlflow(mlflow_server: str, shared: Kube) -> None:
    kube = shared
    experiment = f"op-{uuid.uuid4().hex[:8]}"
    kube.create_job("watch", spec(mlflow={"trackingUri": mlflow_server, "experiment": experiment},
                                  balancePolicy={"threshold": 2.0, "consecutiveReads": 2, "action": "Suspend"}))
    run = wait_for(lambda: kube.status("watch").get("runName"), "the run name")
    wait_for(lambda: kube.condition("watch", "ProgressAvailable").get("reason") == "RunNotFound",
             "RunNotFound before the run exists")
    mlflow, run_id = mlflow_run(mlflow_server, experiment, run)
    kube.set_rayjob_status("watch-a1", jobStatus="RUNNING", jobDeploymentStatus="Running")
    log(mlflow, run_id, 10, loss=2.5, tokens_per_s=1200.0, lr=3e-3, checkpoint_step=10, export_step=10,
        moe__max_over_mean=1.2, moe__normalized_entropy=0.98, moe__layer0__max_over_mean=1.1,
        moe__layer1__max_over_mean=1.3)
    status = wait_for(lambda: (s := kube.status("watch")).get("progress", {}).get("step") == 10 and s,
                      "step 10 in status")
    progress, balance = status["progress"], status["balance"]
    assert (progress["loss"], progress["tokensPerSecond"], progress["latestCheckpointStep"],
            progress["lastExportStep"]) == (2.5, 1200.0, 10, 10)
    assert (balance["maxOverMean"], balance["worstLayer"], balance["readsOverThreshold"]) == (1.2, 1, 0)
    assert kube.condition("watch", "ExpertImbalance")["status"] == "False"
    log(mlflow, run_id, 20, loss=2.4, moe__max_over_mean=3.0)
    wait_for(lambda: kube.status("watch").get("balance", {}).get("readsOverThreshold") == 1, "1 read over")
    assert kube.condition("watch", "ExpertImbalance")["reason"] == "OverThresholdNotYetConsecutive"
    log(mlflow, run_id, 30, loss=2.3, moe__max_over_mean=3.5)
    imbalance = wait_for(lambda: kube.condition("watch", "ExpertImbalance").get("status") == "True"
                         and kube.condition("watch", "ExpertImbalance"), "ExpertImbalance")
    suspended = wait_phase(kube, "watch", "Suspended")
    assert "3.5 > balancePolicy.threshold 2" in imbalance["message"]
    assert (kube.job("watch") or {})["spec"]["suspend"] is True
    assert suspended["progress"]["step"] == 30 and "watch-a1" not in kube.rayjobs("watch")
    wanted = {"ThresholdExceeded", "SuspendedForImbalance"}
    wait_for(lambda: wanted <= {r for t, r, _ in kube.events("watch") if t == "Warning"}, f"warnings {wanted}")
    # Resuming restarts the count: the reads that suspended the job do not suspend it again.
    kube.patch_spec("watch", {"suspend": False})
    wait_for(lambda: kube.rayjobs("watch").get("watch-a2"), "RayJob watch-a2 on resume")
    kube.set_rayjob_status("watch-a2", jobStatus="RUNNING", jobDeploymentStatus="Running")
    running = wait_phase(kube, "watch", "Running")  # the pass that sees RUNNING reads MLflow first
    assert running["balance"]["readsOverThreshold"] == 0 and (kube.job("watch") or {})["spec"]["suspend"] is False
    assert kube.condition("watch", "ExpertImbalance")["status"] == "False"


def test_unreachable_mlflow_keeps_the_last_progress(mlflow_server: str, shared: Kube) -> None:
    kube = shared
    experiment = f"op-{uuid.uuid4().hex[:8]}"
    kube.create_job("blind", spec(mlflow={"trackingUri": mlflow_server, "experiment": experiment}))
    run = wait_for(lambda: kube.status("blind").get("runName"), "the run name")
    mlflow, run_id = mlflow_run(mlflow_server, experiment, run)
    log(mlflow, run_id, 7, loss=3.0)
    wait_for(lambda: kube.status("blind").get("progress", {}).get("step") == 7, "step 7 in status")
    dead = f"http://127.0.0.1:{free_port()}"
    kube.patch_spec("blind", {"mlflow": {"trackingUri": dead}})
    down = wait_for(lambda: kube.condition("blind", "ProgressAvailable").get("reason") == "MLflowUnreachable"
                    and kube.condition("blind", "ProgressAvailable"), "MLflowUnreachable", timeout=40)
    assert dead in down["message"]
    assert kube.status("blind")["progress"]["step"] == 7 and kube.status("blind")["progress"]["loss"] == 3.0


def test_operator_restart_mid_reconcile_creates_no_duplicate(kube: Kube) -> None:
    with running_operator(kube.ns, None):
        kube.create_job("again", spec())
        wait_for(lambda: kube.status("again").get("attempt") == 1, "attempt 1 recorded")
    # As if the operator died after creating the RayJob and before recording it.
    kube.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, kube.ns, PLURAL, "again",
        {"status": {"attempt": None, "rayJob": None, "attempts": None, "phase": None}},
        _content_type="application/merge-patch+json")
    assert "attempt" not in kube.status("again")
    with running_operator(kube.ns, None):
        status = wait_for(lambda: (s := kube.status("again")).get("attempt") == 1 and s, "attempt 1 re-recorded")
    assert list(kube.rayjobs("again")) == ["again-a1"]
    assert "found (created before a restart)" in status["message"]


def test_kuberay_missing_is_a_condition_not_a_crash(cluster: tuple[Cluster, client.ApiClient], kube: Kube) -> None:
    emulated = cluster[0]
    emulated.absent.add("ray.io")
    try:
        with running_operator(kube.ns, None):
            kube.create_job("noray", spec())
            missing = wait_for(lambda: kube.condition("noray", "RayJobCreated").get("reason") == "KubeRayNotInstalled"
                               and kube.condition("noray", "RayJobCreated"), "KubeRayNotInstalled")
            assert "install the KubeRay operator" in missing["message"]
            emulated.absent.discard("ray.io")
            wait_for(lambda: kube.rayjobs("noray").get("noray-a1"), "RayJob noray-a1 once KubeRay serves RayJobs")
    finally:
        emulated.absent.discard("ray.io")
    assert kube.condition("noray", "RayJobCreated")["status"] == "True"


def test_progress_deadline_restarts_the_attempt_with_the_default_mlflow(mlflow_server: str, kube: Kube) -> None:
    # No spec.mlflow.trackingUri: the operator's default (DLMOE_MLFLOW_TRACKING_URI in the chart) is read.
    with running_operator(kube.ns, mlflow_server):
        kube.create_job("hung", spec(progressDeadlineSeconds=1, mlflow={"experiment": f"op-{uuid.uuid4().hex[:8]}"},
                                     restartPolicy={"maxRestarts": 1, "backoffSeconds": 0}))
        wait_for(lambda: kube.rayjobs("hung").get("hung-a1"), "RayJob hung-a1")
        wait_for(lambda: kube.condition("hung", "ProgressAvailable").get("reason") == "RunNotFound",
                 "the default MLflow read")
        kube.set_rayjob_status("hung-a1", jobStatus="RUNNING", jobDeploymentStatus="Running")
        wait_for(lambda: kube.rayjobs("hung").get("hung-a2"), "RayJob hung-a2 after the deadline")
        status = kube.status("hung")
    first = status["attempts"][0]
    assert (first["result"], first["reason"]) == ("Failed", "ProgressDeadlineExceeded")
    assert (parse_stamp(first["endTime"]) - parse_stamp(first["startTime"])).total_seconds() > 1.0
    assert "hung-a1" not in kube.rayjobs("hung")
