"""One reconciliation pass over a ``DiffusionTrainingJob``: read the CR and its current RayJob, decide with the
maths of operators/status.py, create or delete children, write the status once and post an Event per transition.

The pass is level-triggered and idempotent: the create/update handlers, the RayJob watch and the resync timer all run
the same pass, and running it twice changes nothing the first did not. Children have deterministic names, so a pass
cut short (an operator restart between creating a RayJob and recording it) finds the RayJob on the next pass — a 409
on create means "already there" — instead of creating a second one.
"""

from __future__ import annotations

import copy
import datetime
import threading
from typing import Any, NoReturn, cast

import kopf
import yaml

from operators import kube, progress, render
from operators import status as st
from operators.spec import Spec, SpecError, parse


class InvalidSpec(ValueError):
    """The spec breaks a rule; recorded as phase Failed with an Event. Nothing runs until the spec changes."""


class NotReady(RuntimeError):
    """Something outside the spec is missing (a ConfigMap, a Secret, KubeRay); recorded as a condition with an
    Event. ``delay`` is how long a handler should wait before trying again."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


def post_event(cr: dict[str, Any], kind: str, reason: str, message: str) -> None:
    """A Kubernetes Event on the CR, through kopf's poster (batched, retried, never blocking the pass)."""
    kopf.event(kopf.Body(cast(kopf.RawBody, cr)), type=kind, reason=reason, message=message)


class Pass:
    """The state of one pass: the CR as read, the status being built, and the Events to post after it is written."""

    def __init__(self, cr: dict[str, Any], default_mlflow_uri: str | None, when: datetime.datetime) -> None:
        self.cr, self.when, self.default_mlflow_uri = cr, when, default_mlflow_uri
        self.body = kopf.Body(cast(kopf.RawBody, cr))
        self.namespace, self.name = cr["metadata"]["namespace"], cr["metadata"]["name"]
        self.old: dict[str, Any] = cr.get("status") or {}
        self.status: dict[str, Any] = copy.deepcopy(self.old)
        self.events: list[tuple[str, str, str]] = []
        self.run = self.status.get("runName") or render.run_name(self.name, cr["metadata"].get("uid") or "")
        self.text = ""

    # -- bookkeeping -------------------------------------------------------------------------------------------------

    def commit(self) -> None:
        patch = st.status_patch(self.old, self.status)
        if patch:
            kube.patch_job_status(self.namespace, self.name, patch)
            self.old = copy.deepcopy(self.status)
        for kind, reason, message in self.events:
            post_event(self.cr, kind, reason, message)
        self.events.clear()

    def phase(self, phase: str, reason: str, message: str, warning: bool = False) -> None:
        if self.status.get("phase") != phase:
            self.events.append(("Warning" if warning else "Normal", reason, message))
        self.status["phase"], self.status["message"] = phase, message

    def condition(self, kind: str, ok: bool, reason: str, message: str, warn_on_change: bool = False) -> None:
        old = st.condition(self.status, kind)
        if warn_on_change and (old is None or old.get("reason") != reason):
            self.events.append(("Warning", reason, message))
        self.status["conditions"] = st.set_condition(self.status.get("conditions", []), kind, ok, reason, message,
                                                     self.when)

    # -- the pass ----------------------------------------------------------------------------------------------------

    def run_pass(self) -> None:
        if st.condition(self.status, "Complete") is not None:
            # Succeeded, or Failed with its restarts used up: final, whatever the spec says now. (Failed for an
            # invalid spec sets no Complete condition, so a fixed spec starts again.)
            return
        self.status["runName"] = self.run
        self.status["observedGeneration"] = self.cr["metadata"].get("generation", 1)
        try:
            spec = parse(self.cr.get("spec"))
        except SpecError as exc:
            self.invalid(str(exc))
        self.condition("Validated", True, "Valid", "the spec is valid")
        if spec.suspend:
            self.suspend()
            self.commit()
            return
        attempt = int(self.status.get("attempt", 0))
        phase = self.status.get("phase")
        due = st.parse_stamp(self.status.get("nextAttemptTime") or st.stamp(self.when))
        starting = attempt == 0 or phase in (st.SUSPENDED, st.FAILED) or (phase == st.RESTARTING and self.when >= due)
        job = self.job(spec, fresh=starting)
        if starting:
            if attempt:
                # At most one RayJob per CR: the previous attempt's goes first, even one left running when the
                # spec turned invalid (phase Failed) and was then fixed.
                kube.delete_rayjob(self.namespace, render.rayjob_name(self.name, attempt))
                self.status["attempts"] = st.close_attempt(self.status.get("attempts", []), attempt, "Replaced",
                                                           "Replaced", f"attempt {attempt + 1} replaces it", self.when)
            if phase == st.SUSPENDED:
                self.resume()
            self.start(spec, job, attempt + 1)
        elif phase != st.RESTARTING:
            self.observe(spec, job, attempt)
        self.commit()

    def invalid(self, problems: str) -> NoReturn:
        """Phase Failed naming the fields; a running attempt is stopped (its spec can no longer be trusted)."""
        message = f"invalid spec: {problems}"
        attempt = int(self.status.get("attempt", 0))
        if attempt and self.status.get("phase") != st.FAILED:
            kube.delete_rayjob(self.namespace, render.rayjob_name(self.name, attempt))
            self.status["attempts"] = st.close_attempt(self.status.get("attempts", []), attempt, st.FAILED,
                                                       "InvalidSpec", message, self.when)
        self.condition("Validated", False, "InvalidSpec", message)
        self.phase(st.FAILED, "InvalidSpec", message, warning=True)
        self.commit()
        raise InvalidSpec(message)

    def missing(self, exc: kube.InputMissing) -> NoReturn:
        reason = "SecretMissing" if "Secret" in str(exc) else "ConfigMapMissing"
        self.condition("InputsAvailable", False, reason, str(exc), warn_on_change=True)
        self.commit()
        raise NotReady(str(exc), delay=10) from exc

    def job(self, spec: Spec, fresh: bool) -> dict[str, Any]:
        """The job YAML as a mapping; its text is kept for the attempt's ConfigMap. A referenced YAML is read from
        the user's ConfigMap when an attempt starts (``fresh``: a retry picks up a fixed YAML), otherwise from the
        CR's own copy, the one the running attempt mounts, so a running job does not depend on the user's."""
        referenced = None
        if spec.job_configmap is not None and not fresh:
            try:
                referenced = kube.configmap_text(self.namespace, render.configmap_name(self.name), render.JOB_KEY,
                                                 "the job's own ConfigMap")
            except kube.InputMissing:
                fresh = True  # deleted by hand: the user's ConfigMap is the source again
        if spec.job_configmap is not None and fresh:
            cm, key = spec.job_configmap
            try:
                referenced = kube.configmap_text(self.namespace, cm, key, "spec.job.configMapRef")
            except kube.InputMissing as exc:
                self.missing(exc)
        self.text = render.job_text(spec, referenced)
        job = yaml.safe_load(self.text)
        if not isinstance(job, dict):
            self.invalid(f"spec.job.configMapRef: the job YAML is not a mapping (got {type(job).__name__})")
        return job

    def start(self, spec: Spec, job: dict[str, Any], attempt: int) -> None:
        """Start attempt ``attempt``: its inputs checked, the job YAML it runs written to the CR's ConfigMap, its
        RayJob created (or found, when an earlier pass created it)."""
        if spec.credentials is not None:
            secret, id_key, secret_key = spec.credentials
            try:
                kube.check_secret(self.namespace, secret, (id_key, secret_key), "spec.storage.credentialsSecret")
            except kube.InputMissing as exc:
                self.missing(exc)
        self.condition("InputsAvailable", True, "Found", "the job YAML and the referenced Secret are available")
        configmap = render.render_configmap(self.name, self.run, self.text)
        kopf.adopt(configmap, owner=self.body)
        kube.apply_configmap(self.namespace, configmap)
        body = render.render_rayjob(self.name, attempt, self.run, spec, self.mlflow_uri(spec, job))
        kopf.adopt(body, owner=self.body)
        name = body["metadata"]["name"]
        try:
            created = kube.create_rayjob(self.namespace, body)
        except kube.KubeRayMissing as exc:
            self.condition("RayJobCreated", False, "KubeRayNotInstalled", str(exc), warn_on_change=True)
            self.commit()
            raise NotReady(str(exc), delay=30) from exc
        self.condition("RayJobCreated", True, "Created", f"attempt {attempt}: RayJob {name}")
        self.status.update(attempt=attempt, rayJob=name)
        self.status.pop("nextAttemptTime", None)
        self.status["attempts"] = st.open_attempt(self.status.get("attempts", []), attempt, name, self.when)
        verb = "created" if created else "found (created before a restart)"
        self.phase(st.PENDING, "AttemptStarted", f"attempt {attempt}: RayJob {name} {verb}, run {self.run}")

    def observe(self, spec: Spec, job: dict[str, Any], attempt: int) -> None:
        name = render.rayjob_name(self.name, attempt)
        rayjob = kube.get_rayjob(self.namespace, name)
        if rayjob is None:
            # Recorded but absent: deleted by someone, or lost before the API stored it. Same attempt, same name.
            self.start(spec, job, attempt)
            return
        readable = self.read_progress(spec, job)
        outcome = st.rayjob_outcome(rayjob.get("status"))
        if outcome.phase == st.RUNNING:
            self.phase(st.RUNNING, "AttemptRunning", f"attempt {attempt}: {outcome.message}")
            # A record lost with a hand-edited status is opened again, so the deadline has a start.
            self.status["attempts"] = st.open_attempt(self.status.get("attempts", []), attempt, name, self.when)
            record = next(a for a in self.status["attempts"] if a.get("number") == attempt)
            advanced = self.status.get("progress", {}).get("advancedTime")
            if readable and st.deadline_exceeded(spec.progress_deadline_seconds, record["startTime"], advanced,
                                                 self.when):
                kube.delete_rayjob(self.namespace, name)
                self.fail(spec, attempt, "ProgressDeadlineExceeded",
                          f"no step advance for {spec.progress_deadline_seconds}s")
        elif outcome.phase == st.SUCCEEDED:
            self.status["attempts"] = st.close_attempt(self.status.get("attempts", []), attempt, st.SUCCEEDED,
                                                       outcome.reason, outcome.message, self.when)
            self.condition("Complete", True, outcome.reason, f"attempt {attempt}: {outcome.message}")
            self.phase(st.SUCCEEDED, "Succeeded", f"attempt {attempt} succeeded: run {self.run}")
        elif outcome.phase == st.FAILED:
            self.fail(spec, attempt, outcome.reason, outcome.message)

    def fail(self, spec: Spec, attempt: int, reason: str, message: str) -> None:
        self.status["attempts"] = st.close_attempt(self.status.get("attempts", []), attempt, st.FAILED, reason,
                                                   message, self.when)
        if st.restarts_left(attempt, spec.max_restarts):
            delay = st.backoff_seconds(attempt, spec.backoff_seconds, spec.max_backoff_seconds)
            self.status["nextAttemptTime"] = st.stamp(self.when + datetime.timedelta(seconds=delay))
            self.phase(st.RESTARTING, reason, f"attempt {attempt} failed ({reason}: {message}); attempt "
                                              f"{attempt + 1} in {delay}s resumes run {self.run}", warning=True)
        else:
            self.condition("Complete", False, "RestartLimitExceeded", f"attempt {attempt} failed ({reason})")
            self.phase(st.FAILED, "RestartLimitExceeded", f"attempt {attempt} failed ({reason}: {message}) and "
                                                          f"restartPolicy.maxRestarts={spec.max_restarts} is used up",
                       warning=True)

    def suspend(self) -> None:
        attempt = int(self.status.get("attempt", 0))
        if attempt:
            kube.delete_rayjob(self.namespace, render.rayjob_name(self.name, attempt))
        self.status["attempts"] = st.close_attempt(self.status.get("attempts", []), attempt, st.SUSPENDED,
                                                   "Suspended", "spec.suspend is true", self.when)
        self.status.pop("nextAttemptTime", None)
        message = f"spec.suspend is true: no RayJob runs; run {self.run} resumes from its latest checkpoint"
        self.condition("Suspended", True, "Suspended", message)
        self.phase(st.SUSPENDED, "Suspended", message)

    def resume(self) -> None:
        self.condition("Suspended", False, "Resumed", f"resumed: run {self.run} continues from its latest checkpoint")
        if "balance" in self.status:
            # Resuming is the user's answer to the imbalance so far: count afresh, or a job suspended for imbalance
            # would be suspended again by the reads that suspended it.
            self.status["balance"] = {**self.status["balance"], "readsOverThreshold": 0}
            self.condition("ExpertImbalance", False, "Resumed", "the count of reads over the threshold restarts")

    # -- progress from MLflow ----------------------------------------------------------------------------------------

    def mlflow_uri(self, spec: Spec, job: dict[str, Any]) -> str | None:
        tracking = job.get("tracking")
        tracking = tracking if isinstance(tracking, dict) else {}
        return spec.mlflow_uri or self.default_mlflow_uri or tracking.get("uri") or None

    def read_progress(self, spec: Spec, job: dict[str, Any]) -> bool:
        """Progress and balance from MLflow into the status; false when MLflow could not be read (the last known
        progress stays, and a condition says why)."""
        uri = self.mlflow_uri(spec, job)
        if not uri:
            self.condition("ProgressAvailable", False, "NoTrackingUri", "neither spec.mlflow.trackingUri, the "
                           "operator's DLMOE_MLFLOW_TRACKING_URI nor the job's tracking.uri is set")
            return False
        experiment = render.experiment(spec, job)
        try:
            reading = progress.read(uri, experiment, self.run)
        except progress.ProgressUnavailable as exc:
            self.condition("ProgressAvailable", False, "MLflowUnreachable", f"{exc}; showing the last known "
                           "progress", warn_on_change=True)
            return False
        if not reading.found:
            self.condition("ProgressAvailable", False, "RunNotFound",
                           f"no MLflow run tagged dlmoe.run_name={self.run} in experiment {experiment!r} yet")
            return True
        self.condition("ProgressAvailable", True, "Read", f"MLflow run of {self.run} in {experiment!r} at {uri}")
        found, balance = progress.summarise(reading)
        old = self.status.get("progress", {})
        new = {**old, **found}
        if "step" in found and found["step"] > old.get("step", -1):
            new["advancedTime"] = st.stamp(self.when)
        self.status["progress"] = new
        if balance:
            self.apply_balance(spec, balance)
        return True

    def apply_balance(self, spec: Spec, balance: dict[str, Any]) -> None:
        old = self.status.get("balance", {})
        reads = st.balance_reads(old, balance.get("maxOverMean"), balance.get("step"), spec.balance_threshold)
        self.status["balance"] = {**balance, "readsOverThreshold": reads}
        value = balance.get("maxOverMean")
        if value is None:
            return
        if reads >= spec.balance_reads:
            where = f", worst layer {balance['worstLayer']}" if "worstLayer" in balance else ""
            message = (f"moe/max_over_mean {value:.3g} > balancePolicy.threshold {spec.balance_threshold:g} for "
                       f"{reads} consecutive reads{where}; action {spec.balance_action}")
            was = (st.condition(self.status, "ExpertImbalance") or {}).get("status")
            self.condition("ExpertImbalance", True, "ThresholdExceeded", message, warn_on_change=True)
            if spec.balance_action == "Suspend" and was != "True":
                kube.patch_job_spec(self.namespace, self.name, {"suspend": True})
                self.events.append(("Warning", "SuspendedForImbalance", message))
        else:
            self.condition("ExpertImbalance", False, "WithinThreshold" if value <= spec.balance_threshold
                           else "OverThresholdNotYetConsecutive",
                           f"moe/max_over_mean {value:.3g}, threshold {spec.balance_threshold:g} "
                           f"({reads}/{spec.balance_reads} reads over)")


class Reconciler:
    """Runs passes, one at a time per CR: the handlers, the watch and the timer may fire together, and two
    concurrent passes would both see "no RayJob yet"."""

    def __init__(self, default_mlflow_uri: str | None) -> None:
        self.default_mlflow_uri = default_mlflow_uri
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def reconcile(self, namespace: str, name: str) -> None:
        with self._lock(namespace, name):
            cr = kube.get_job(namespace, name)
            if cr is None or cr["metadata"].get("deletionTimestamp"):
                return
            Pass(cr, self.default_mlflow_uri, st.now()).run_pass()

    def forget(self, namespace: str, name: str) -> None:
        with self._guard:
            self._locks.pop((namespace, name), None)
