"""The path a user takes on Kubernetes, as one test: the example ``DiffusionTrainingJob`` (jobs/examples/debug-cpu.yaml)
created → the real operator (kopf + the kubernetes client) renders its ConfigMap and RayJob → KubeRay's part, played
by tests/e2e/kuberay_double.py, submits the RayJob's entrypoint through the real Ray Jobs API to a local
``ray start --head`` → ``dlmoe train`` reads the job YAML from the rendered ConfigMap, checkpoints to a moto S3 bucket
and logs to a real ``mlflow server`` → the CR's status follows the run → the Ray job is stopped mid-run, as a lost
head pod ends it → the operator records the failed attempt, backs off and starts attempt 2 → the run resumes from
its newest checkpoint in S3, in the same MLflow run → Succeeded, the model exported to S3 and registered in MLflow,
its weights equal to an uninterrupted run of the same job.

What stands in for a cluster: kmock's Kubernetes emulator (no real kube-apiserver is obtainable on these machines)
and the KubeRay double (no KubeRay operator either). The example is adapted in its storage and tracking settings
(the bucket, the endpoint and a Secret holding its credentials; the MLflow server; a registered-model name for its
exports) and, through its own ``spec.overrides`` list (a user-facing field), trained for 12 steps instead of 1000
with a checkpoint every 2. The status is also read as users read it, with ``kubectl get dtj`` (the emulator renders
the CRD's printer columns as kube-apiserver does).
"""

from __future__ import annotations

import shlex
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from operators.status import parse_stamp
from tests.e2e.k8s_platform import Platform, adapt, example, find_kubectl, printer_columns, running_platform
from tests.integration.operator_harness import wait_for

STEPS = 12
OVERRIDES = [f"train.steps={STEPS}", "train.warmup_steps=2", "train.log_every=1", "checkpoint.every_steps=2"]
MODEL = "debug-cpu-e2e"


def train_uninterrupted(platform: Platform, work: Path) -> dict[str, Any]:
    """The same job and overrides as one Ray job submitted straight to the head, never interrupted: the reference
    the resumed run must end equal to."""
    job = work / "job.yaml"
    job.write_text(yaml.safe_dump(example()["spec"]["job"]["inline"], sort_keys=False))
    summary = work / "summary.json"
    ray = JobSubmissionClient(platform.head.address, headers={"Authorization": f"Bearer {platform.head.token}"})
    submission = ray.submit_job(entrypoint=shlex.join([
        "dlmoe", "train", str(job), *OVERRIDES, f"checkpoint.storage={work / 'runs'}", "run_name=uninterrupted",
        "tracking.enabled=false", "export.enabled=false", "--no-progress", "--summary-json", str(summary)]))
    status = wait_for(lambda: (s := ray.get_job_status(submission)).is_terminal() and s, "the uninterrupted run",
                      timeout=300, interval=1.0)
    assert status == JobStatus.SUCCEEDED, f"the uninterrupted run {status}:\n{ray.get_job_logs(submission)[-3000:]}"
    return dict(yaml.safe_load(summary.read_text()))


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    with running_platform(tmp_path) as running:
        yield running


def kubectl_get_dtj(kubectl: str, platform: Platform) -> dict[str, str]:
    """``kubectl get dtj`` of the one CR in the namespace, by printer column (the API server's Table)."""
    return printer_columns(platform.kubectl(kubectl, "get", "dtj"))


def in_order(wanted: list[str], found: list[str]) -> bool:
    """Whether ``wanted`` is a subsequence of ``found``."""
    rest = iter(found)
    return all(any(item == x for x in rest) for item in wanted)


def follow(kube: Platform, name: str, until: Callable[[dict[str, Any]], bool], what: str,
           seen: list[dict[str, Any]], timeout: float) -> dict[str, Any]:
    """Poll the CR's status until ``until`` holds, keeping each distinct status in ``seen``."""
    def check() -> dict[str, Any] | None:
        status = kube.status(name)
        if not seen or seen[-1] != status:
            seen.append(status)
        return status if until(status) else None

    return dict(wait_for(check, what, timeout=timeout, interval=0.5))


def test_a_custom_resource_trains_survives_a_stopped_ray_job_and_exports_the_model(
        platform: Platform, mlflow_server: str, s3_endpoint: str, make_bucket: Callable[[str], str],
        tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from dlmoe.export.hf import load_config, read_state
    from dlmoe.export.remote import local_folder
    from dlmoe.parallel import params_sha256

    kube, double = platform, platform.double
    kubectl = find_kubectl()
    assert kubectl, "kubectl is neither on the PATH nor in .tools/: run `make helm` (make test does) to fetch it"
    uninterrupted = train_uninterrupted(platform, tmp_path)
    bucket = make_bucket(f"dlmoe-e2e-{uuid.uuid4().hex[:8]}")
    kube.create_credentials("testing", "testing")  # what moto accepts
    cr = adapt(example(), bucket, s3_endpoint, mlflow_server, OVERRIDES, MODEL)
    spec = cr["spec"]
    started = time.monotonic()
    name = kube.apply(cr)

    # Attempt 1 trains; the status follows it from MLflow. Stopped once a checkpoint is in S3 and steps are past it.
    seen: list[dict[str, Any]] = []
    running = follow(kube, name, lambda s: s.get("phase") == "Running"
                     and s.get("progress", {}).get("latestCheckpointStep", 0) >= 2
                     and s["progress"].get("step", 0) >= 4, "attempt 1 past a checkpoint", seen, 300)
    run = running["runName"]
    rayjob = kube.rayjobs()[f"{name}-a1"]
    configmap = kube.core.read_namespaced_config_map(f"{name}-job", kube.ns).data or {}
    assert yaml.safe_load(configmap["job.yaml"]) == spec["job"]["inline"]
    assert f"{name}-a1" in double.submitted and "/etc/dlmoe/job/job.yaml" in rayjob["spec"]["entrypoint"]
    shown = kubectl_get_dtj(kubectl, kube)
    assert (shown["NAME"], shown["PHASE"], shown["ATTEMPTS"]) == (name, "Running", "1") and int(shown["STEP"]) >= 4
    double.stop_ray_job(f"{name}-a1")

    restarting = follow(kube, name, lambda s: s.get("phase") == "Restarting", "phase Restarting", seen, 60)
    first = restarting["attempts"][0]
    assert (first["number"], first["result"], first["reason"]) == (1, "Failed", "JobStopped"), first
    assert f"attempt 2 in {spec['restartPolicy']['backoffSeconds']}s resumes run {run}" in restarting["message"]
    done = follow(kube, name, lambda s: s.get("phase") in ("Succeeded", "Failed"), "the end", seen, 400)
    elapsed = time.monotonic() - started
    assert done["phase"] == "Succeeded", f"{done}\n--- attempt 2's Ray job:\n{double.logs(f'{name}-a2')[-4000:]}"
    print(f"\nDiffusionTrainingJob created -> Succeeded in {elapsed:.0f} s (2 attempts, {STEPS} steps)")

    # Attempts: 1 stopped, then 2 after the backoff, same run; the operator removed the RayJob of attempt 1.
    one, two = done["attempts"]
    assert (two["number"], two["result"]) == (2, "Succeeded") and done["attempt"] == 2
    waited = (parse_stamp(two["startTime"]) - parse_stamp(one["endTime"])).total_seconds()
    assert waited >= spec["restartPolicy"]["backoffSeconds"], f"attempt 2 began {waited:.1f}s after attempt 1 ended"
    assert list(kube.rayjobs()) == [f"{name}-a2"] and list(double.submitted) == [f"{name}-a1", f"{name}-a2"]
    a2 = kube.rayjobs()[f"{name}-a2"]["status"]
    assert (a2["jobStatus"], a2["jobDeploymentStatus"], a2["succeeded"], a2["failed"]) == ("SUCCEEDED", "Complete",
                                                                                            1, 0)
    assert a2["startTime"] and a2["endTime"]
    assert f"run_name={run}" in kube.rayjobs()[f"{name}-a2"]["spec"]["entrypoint"]

    shown = kubectl_get_dtj(kubectl, kube)
    assert (shown["PHASE"], shown["STEP"], shown["ATTEMPTS"]) == ("Succeeded", str(STEPS), "2"), shown
    assert float(shown["LOSS"]) == pytest.approx(done["progress"]["loss"], rel=1e-6)
    assert float(shown["BALANCE"]) == pytest.approx(done["balance"]["maxOverMean"], rel=1e-6)

    # The status advanced: phases in order, step and loss moving, balance read.
    phases = [s.get("phase") for s in seen]
    changes = [p for i, p in enumerate(phases) if p and (i == 0 or phases[i - 1] != p)]
    assert in_order(["Running", "Restarting", "Running", "Succeeded"], changes), changes
    steps = [s["progress"]["step"] for s in seen if "step" in s.get("progress", {})]
    assert len(set(steps)) >= 3 and steps[-1] == STEPS, steps
    losses = [s["progress"]["loss"] for s in seen if "loss" in s.get("progress", {})]
    assert len(set(losses)) >= 3 and losses[-1] < losses[0], losses
    assert 1.0 <= done["balance"]["maxOverMean"] < 8.0 and done["progress"]["latestCheckpointStep"] == STEPS

    # One MLflow run across both attempts; attempt 2 took up after a checkpoint of attempt 1 and repeated no step
    # before it (the steps between that checkpoint and the stop ran again, to the same losses).
    mlflow = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    experiment = mlflow.get_experiment_by_name(spec["mlflow"]["experiment"])
    assert experiment is not None
    (found,) = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.`dlmoe.run_name` = '{run}'")
    history = mlflow.get_metric_history(found.info.run_id, "loss")
    resumed_at = parse_stamp(two["startTime"]).timestamp() * 1000
    before = [m for m in history if m.timestamp < resumed_at]
    after = [m for m in history if m.timestamp >= resumed_at]
    checkpoints = {int(m.value) for m in mlflow.get_metric_history(found.info.run_id, "checkpoint_step")}
    restart_step = min(m.step for m in after) - 1
    assert restart_step in checkpoints and 2 <= restart_step <= max(m.step for m in before), (restart_step, checkpoints)
    assert sorted(m.step for m in after) == list(range(restart_step + 1, STEPS + 1))
    assert sorted(m.step for m in before) == list(range(1, max(m.step for m in before) + 1))
    assert all(m.value == next(b.value for b in before if b.step == m.step) for m in after if m.step in
               {b.step for b in before}), "a step run again gave another loss"
    logged = {m.step: m.value for m in before + after}
    assert [logged[s] for s in range(1, STEPS + 1)] == pytest.approx(uninterrupted["losses"], rel=1e-6)

    # The export: in S3, registered in MLflow from that run, and the weights of the uninterrupted run.
    export_uri = f"s3://{bucket}/runs/{run}/hf"
    with local_folder(export_uri, s3_endpoint) as folder:
        exported = params_sha256(read_state(folder, load_config(folder)))
    assert exported == uninterrupted["params_sha256"]
    (version,) = mlflow.search_model_versions(f"name='{MODEL}'")
    assert (version.source, version.run_id) == (export_uri, found.info.run_id)

    # Every transition was an Event on the CR.
    wanted = [("Normal", "AttemptStarted"), ("Normal", "AttemptRunning"), ("Warning", "JobStopped"),
              ("Normal", "Succeeded")]
    events = wait_for(lambda: (e := kube.events(name)) and set(wanted) <= {(t, r) for t, r, _ in e} and e,
                      f"Events {wanted}")
    assert sum(r == "AttemptStarted" for _, r, _ in events) == 2, events
