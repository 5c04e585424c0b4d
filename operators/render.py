"""Children of a ``DiffusionTrainingJob``, as pure functions of the custom resource: names, the ConfigMap with the
job YAML and the KubeRay ``RayJob`` of one attempt (DESIGN.md habit 7: rendering is tested on its own).

Names are deterministic so that an operator restarted mid-reconcile finds what it created instead of creating a
duplicate: the RayJob of attempt N is ``<cr>-a<N>``, the ConfigMap ``<cr>-job``. The run name is fixed per CR uid and
passed to ``dlmoe train`` on every attempt, so each retry resumes the same run from its latest checkpoint and logs
into the same MLflow run.
"""

from __future__ import annotations

import shlex
from typing import Any

import yaml

from operators.spec import Spec

GROUP, VERSION, PLURAL, KIND = "dlmoe.io", "v1alpha1", "diffusiontrainingjobs", "DiffusionTrainingJob"
RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayjobs"
# The Ray release the training image ships (pyproject pins ray 2.60.*); KubeRay uses it to pick compatible
# start-up flags for the cluster.
RAY_RELEASE = "2.60.0"
JOB_KEY = "job.yaml"
JOB_DIR = "/etc/dlmoe/job"
MANAGED_BY = "dlmoe-operator"
LABEL_JOB = "dlmoe.io/job"
LABEL_ATTEMPT = "dlmoe.io/attempt"
LABEL_RUN = "dlmoe.io/run-name"


def run_name(name: str, uid: str) -> str:
    """The training run of the CR ``name``: stable across attempts, suspend/resume and operator restarts, and
    distinct for a CR deleted and created again under the same name (a new uid, so a fresh run)."""
    return f"{name}-{uid.replace('-', '')[:8]}"


def rayjob_name(name: str, attempt: int) -> str:
    return f"{name}-a{attempt}"


def configmap_name(name: str) -> str:
    return f"{name}-job"


def labels(name: str, run: str) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": MANAGED_BY, "app.kubernetes.io/name": "dlmoe", LABEL_JOB: name,
            LABEL_RUN: run}


def job_text(spec: Spec, referenced: str | None) -> str:
    """The job YAML the attempts run: the inline object dumped, else the text of the referenced ConfigMap key."""
    if spec.inline_job is not None:
        return yaml.safe_dump(spec.inline_job, sort_keys=False)
    assert referenced is not None, "a configMapRef spec needs the referenced text"
    return referenced


def experiment(spec: Spec, job: dict[str, Any]) -> str:
    """The MLflow experiment of the run: ``spec.mlflow.experiment``, else the job's ``tracking.experiment``, else
    the dlmoe default (platform/dlmoe/config.py ``TrackingConfig``)."""
    tracking = job.get("tracking")
    tracking = tracking if isinstance(tracking, dict) else {}
    return spec.experiment or str(tracking.get("experiment") or "dlmoe")


def overrides(spec: Spec, run: str) -> list[str]:
    """``key=value`` overrides for ``dlmoe train``: the run name first, then what the spec's storage, MLflow and
    export fields set, then the user's own (last, so they win)."""
    items = [f"run_name={run}"]
    if spec.checkpoint_uri:
        items.append(f"checkpoint.storage={spec.checkpoint_uri}")
    if spec.experiment:
        items.append(f"tracking.experiment={spec.experiment}")
    names = {"enabled": "enabled", "uri": "uri", "everyNCheckpoints": "every_n_checkpoints", "register": "register"}
    for key, value in spec.export.items():
        items.append(f"export.{names[key]}={str(value).lower() if isinstance(value, bool) else value}")
    items.extend(spec.overrides)
    return items


def entrypoint(spec: Spec, run: str) -> str:
    return shlex.join(["dlmoe", "train", f"{JOB_DIR}/{JOB_KEY}", *overrides(spec, run), "--no-progress"])


def render_configmap(name: str, run: str, text: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": configmap_name(name), "labels": labels(name, run)},
            "data": {JOB_KEY: text}}


def _env(spec: Spec, mlflow_uri: str | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if mlflow_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": mlflow_uri})
    if spec.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": spec.s3_endpoint})
    if spec.credentials:
        secret, id_key, secret_key = spec.credentials
        for var, key in (("AWS_ACCESS_KEY_ID", id_key), ("AWS_SECRET_ACCESS_KEY", secret_key)):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    return env


def _pod(name: str, spec: Spec, role: str, env: list[dict[str, Any]], cpu: str, memory: str,
         gpus: int) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    container: dict[str, Any] = {
        "name": f"ray-{role}", "image": spec.image, "imagePullPolicy": spec.pull_policy, "env": env,
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits},
        "volumeMounts": [{"name": "job", "mountPath": JOB_DIR, "readOnly": True}],
    }
    if role == "head":
        container["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                              {"containerPort": 10001, "name": "client"}]
    return {"spec": {"containers": [container],
                     "volumes": [{"name": "job", "configMap": {"name": configmap_name(name)}}]}}


def render_rayjob(name: str, attempt: int, run: str, spec: Spec, mlflow_uri: str | None) -> dict[str, Any]:
    """The KubeRay ``RayJob`` of attempt ``attempt``: a head (driver only: ``num-cpus: 0`` keeps training off it)
    and one worker group of ``spec.replicas`` pods with the requested resources. KubeRay's own retries are off
    (``backoffLimit: 0``): the operator retries, so that every attempt is recorded and backs off."""
    env = _env(spec, mlflow_uri)
    meta_labels = {**labels(name, run), LABEL_ATTEMPT: str(attempt)}
    return {
        "apiVersion": f"{RAY_GROUP}/{RAY_VERSION}", "kind": "RayJob",
        "metadata": {"name": rayjob_name(name, attempt), "labels": meta_labels},
        "spec": {
            "entrypoint": entrypoint(spec, run),
            "shutdownAfterJobFinishes": True,
            "backoffLimit": 0,
            "rayClusterSpec": {
                "rayVersion": RAY_RELEASE,
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                    "template": _pod(name, spec, "head", env, spec.head_cpu, spec.head_memory, 0),
                },
                "workerGroupSpecs": [{
                    "groupName": "workers", "replicas": spec.replicas, "minReplicas": spec.replicas,
                    "maxReplicas": spec.replicas, "rayStartParams": {},
                    "template": _pod(name, spec, "worker", env, spec.worker_cpu, spec.worker_memory, spec.gpus),
                }],
            },
        },
    }
