"""KubeRay's side of the ``RayJob`` contract, as a test double: a controller that reconciles the RayJobs of one
namespace in the Kubernetes emulator and runs each one's ``spec.entrypoint`` (with its ``spec.runtimeEnvYAML``)
through the real Ray Jobs API (``JobSubmissionClient``) on a local ``ray start --head`` cluster.

What it writes is what KubeRay v1.7's RayJob controller writes (ray-operator/apis/ray/v1/rayjob_types.go,
``RayJobStatus``; controllers/ray/rayjob_controller.go):

- ``status.jobDeploymentStatus``: ``Initializing`` when it takes the RayJob up (``status.startTime`` is stamped
  then: "the time when JobDeploymentStatus transitioned from 'New' to 'Initializing'"), ``Running`` once the job is
  submitted, and at a terminal Ray job status ``Complete`` — or ``Failed`` with ``reason: AppFailed`` when Ray's
  status is ``FAILED``. A ``STOPPED`` job is ``Complete`` with ``jobStatus: STOPPED``, as in KubeRay;
- ``status.jobStatus``: Ray's own job status (``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED``, ``STOPPED``) and
  ``status.message`` Ray's message; ``status.jobId`` the submission id, ``status.dashboardURL``;
- ``status.endTime`` when the deployment status turns ``Complete`` or ``Failed``, and the counters
  ``status.succeeded`` / ``status.failed`` as ``checkBackoffLimitAndUpdateStatusIfNeeded`` counts them;
  ``status.rayJobInfo.startTime`` / ``endTime`` from Ray's job info.

Like KubeRay's reconciler it is level-triggered: it lists the RayJobs every ``period`` seconds (KubeRay requeues
every few seconds too) and moves each one on from its recorded status. Where a pod is needed it does the little a
kubelet would do for the entrypoint: the head container's ``env`` (values, and ``secretKeyRef``s read from the
API) becomes the job's environment, and each ConfigMap volume the head mounts is written to a folder whose path
replaces the mount path in the entrypoint (this process cannot mount at ``/etc``). What it does not do: create a
RayCluster, pods or a submitter Job — every RayJob runs on the one local head — nor honour
``backoffLimit`` retries, suspension or ``activeDeadlineSeconds`` (our operator sets ``backoffLimit: 0`` and
retries on its own). Deleting a RayJob deletes its cluster in KubeRay, which ends the Ray job: here it stops it.
"""

from __future__ import annotations

import base64
import datetime
import shlex
import threading
from pathlib import Path
from typing import Any, cast

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from ray.job_submission import JobStatus, JobSubmissionClient

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
MERGE_PATCH = "application/merge-patch+json"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stamp_ms(millis: int | None) -> str | None:
    if not millis:
        return None
    return datetime.datetime.fromtimestamp(millis / 1000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeRayDouble:
    """Reconciles the RayJobs of ``namespace`` from a thread until ``close``; ``errors`` holds what broke it."""

    def __init__(self, api: client.ApiClient, namespace: str, ray_address: str, ray_token: str, mounts: Path,
                 period: float = 0.5) -> None:
        self.custom, self.core, self.namespace = client.CustomObjectsApi(api), client.CoreV1Api(api), namespace
        self.ray = JobSubmissionClient(ray_address, headers={"Authorization": f"Bearer {ray_token}"})
        self.ray_address, self.mounts, self.period = ray_address, mounts, period
        self.submitted: dict[str, str] = {}  # RayJob name -> Ray submission id, for every job this double ran
        self.errors: list[BaseException] = []
        self._live: dict[str, str] = {}  # RayJob uid -> submission id, while the RayJob exists
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kuberay-double", daemon=True)

    def __enter__(self) -> KubeRayDouble:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for submission in self._live.values():
            self._stop_ray_job(submission)

    def stop_ray_job(self, rayjob: str) -> None:
        """End the Ray job of ``rayjob`` as a lost head pod would: ``JobSubmissionClient.stop_job``."""
        if not self.ray.stop_job(self.submitted[rayjob]):
            raise AssertionError(f"the Ray job of RayJob {rayjob} ({self.submitted[rayjob]}) had already ended")

    def logs(self, rayjob: str) -> str:
        return str(self.ray.get_job_logs(self.submitted[rayjob]))

    # -- the controller --------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self._pass()
            except BaseException as exc:  # the test reads it: a broken double must fail the test, not hang it
                self.errors.append(exc)
                return

    def _pass(self) -> None:
        listed = cast(dict[str, Any], self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL))
        found: list[dict[str, Any]] = listed["items"]
        uids = set()
        for rayjob in found:
            uids.add(rayjob["metadata"]["uid"])
            if not rayjob["metadata"].get("deletionTimestamp"):
                self._reconcile(rayjob)
        for uid in set(self._live) - uids:  # deleted: KubeRay deletes its cluster, and with it the Ray job
            self._stop_ray_job(self._live.pop(uid))

    def _reconcile(self, rayjob: dict[str, Any]) -> None:
        name, uid = rayjob["metadata"]["name"], rayjob["metadata"]["uid"]
        status = rayjob.get("status") or {}
        deployment = status.get("jobDeploymentStatus", "")
        if deployment == "":
            submission = rayjob["spec"].get("jobId") or f"{name}-{uid[:8]}"
            self._patch(name, {"jobDeploymentStatus": "Initializing", "startTime": _now(), "jobId": submission,
                               "rayClusterName": f"{name}-raycluster", "dashboardURL": self.ray_address,
                               "failed": 0, "succeeded": 0})
        elif deployment == "Initializing":
            self._submit(rayjob, status["jobId"])
            self._patch(name, {"jobDeploymentStatus": "Running", "jobStatus": JobStatus.PENDING.value})
        elif deployment == "Running":
            self._observe(rayjob, status)

    def _submit(self, rayjob: dict[str, Any], submission: str) -> None:
        name, uid = rayjob["metadata"]["name"], rayjob["metadata"]["uid"]
        spec = rayjob["spec"]
        pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        (head,) = pod["containers"]
        runtime_env: dict[str, Any] = yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}
        # The pod's environment first; the runtime env's own variables win, as they do in a Ray job.
        runtime_env["env_vars"] = {**self._env(head.get("env", [])), **runtime_env.get("env_vars", {})}
        entrypoint = self._mount(name, pod.get("volumes", []), head.get("volumeMounts", []), spec["entrypoint"])
        self.ray.submit_job(entrypoint=entrypoint, submission_id=submission, runtime_env=runtime_env)
        self.submitted[name], self._live[uid] = submission, submission

    def _observe(self, rayjob: dict[str, Any], status: dict[str, Any]) -> None:
        info = self.ray.get_job_info(status["jobId"])
        patch: dict[str, Any] = {"jobStatus": info.status.value, "message": info.message or ""}
        times = {"startTime": _stamp_ms(info.start_time), "endTime": _stamp_ms(info.end_time)}
        patch["rayJobInfo"] = {k: v for k, v in times.items() if v}
        if info.status.is_terminal():
            failed = info.status == JobStatus.FAILED
            patch.update(jobDeploymentStatus="Failed" if failed else "Complete", endTime=_now(),
                         failed=int(status.get("failed", 0)) + int(failed),
                         succeeded=int(status.get("succeeded", 0)) + int(info.status == JobStatus.SUCCEEDED))
            if failed:
                patch["reason"] = "AppFailed"
            self._live.pop(rayjob["metadata"]["uid"], None)
        if any(status.get(k) != v for k, v in patch.items()):
            self._patch(rayjob["metadata"]["name"], patch)

    # -- what a kubelet would do for the head pod ------------------------------------------------------------------

    def _env(self, env: list[dict[str, Any]]) -> dict[str, str]:
        out = {}
        for item in env:
            if "value" in item:
                out[item["name"]] = str(item["value"])
                continue
            ref = item["valueFrom"]["secretKeyRef"]
            secret = self.core.read_namespaced_secret(ref["name"], self.namespace)
            data = dict(secret.data or {})
            if ref["key"] not in data:
                raise KeyError(f"env {item['name']}: Secret {self.namespace}/{ref['name']} has no key {ref['key']!r}")
            out[item["name"]] = base64.b64decode(data[ref["key"]]).decode()
        return out

    def _mount(self, name: str, volumes: list[dict[str, Any]], mounts: list[dict[str, Any]], entrypoint: str) -> str:
        """Write each ConfigMap volume the head mounts under ``self.mounts/<rayjob>/`` and point the entrypoint's
        arguments under its mount path there."""
        sources = {v["name"]: v["configMap"]["name"] for v in volumes if "configMap" in v}
        words = shlex.split(entrypoint)
        for mount in mounts:
            if mount["name"] not in sources:
                continue
            data = self.core.read_namespaced_config_map(sources[mount["name"]], self.namespace).data or {}
            folder = self.mounts / name / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            for key, text in data.items():
                (folder / key).write_text(text)
            prefix = mount["mountPath"].rstrip("/") + "/"
            words = [str(folder / w[len(prefix):]) if w.startswith(prefix) else w for w in words]
        return shlex.join(words)

    def _patch(self, name: str, status: dict[str, Any]) -> None:
        try:
            self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, PLURAL, name,
                                                              {"status": status}, _content_type=MERGE_PATCH)
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing left to report on
                raise

    def _stop_ray_job(self, submission: str) -> None:
        if not self.ray.get_job_status(submission).is_terminal():
            self.ray.stop_job(submission)
