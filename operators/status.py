"""The maths of a ``DiffusionTrainingJob``'s status: phases, conditions, attempts, backoff, what a RayJob's status
means, the progress deadline and the expert-balance policy. Pure functions over plain dicts, so every rule is unit
tested without an API server; the reconciler (operators/reconcile.py) only applies what they decide.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

PENDING, RUNNING, RESTARTING = "Pending", "Running", "Restarting"
SUCCEEDED, FAILED, SUSPENDED = "Succeeded", "Failed", "Suspended"

# KubeRay v1 RayJob status: jobStatus is Ray's own job state, jobDeploymentStatus the state of the cluster and the
# submission around it (ray-operator/apis/ray/v1/rayjob_types.go).
JOB_FAILED_STATES = ("FAILED", "STOPPED")
DEPLOYMENT_FAILED = "Failed"
DEPLOYMENT_COMPLETE = "Complete"


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def stamp(when: datetime.datetime) -> str:
    # Microseconds: backoffs of a second or two must compare exactly (RFC 3339 allows the fraction).
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_stamp(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def set_condition(conditions: list[dict[str, Any]], kind: str, status: bool, reason: str, message: str,
                  when: datetime.datetime) -> list[dict[str, Any]]:
    """``conditions`` with the condition ``kind`` set; ``lastTransitionTime`` moves only when its status flips,
    so it says since when the condition has held."""
    value = "True" if status else "False"
    out = [dict(c) for c in conditions if c.get("type") != kind]
    old = next((c for c in conditions if c.get("type") == kind), None)
    since = old["lastTransitionTime"] if old and old.get("status") == value and old.get("lastTransitionTime") \
        else stamp(when)
    out.append({"type": kind, "status": value, "reason": reason, "message": message, "lastTransitionTime": since})
    return sorted(out, key=lambda c: str(c["type"]))


def condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions", []) if c.get("type") == kind), None)


def backoff_seconds(failed_attempt: int, base: int, cap: int) -> int:
    """Delay before the attempt after ``failed_attempt`` (1-based): ``base · 2^(n-1)``, at most ``cap``."""
    return int(min(base * 2 ** max(failed_attempt - 1, 0), cap))


@dataclass(frozen=True)
class Outcome:
    """What a RayJob's status says about its attempt: ``phase`` is Pending, Running, Succeeded or Failed."""

    phase: str
    reason: str
    message: str


def rayjob_outcome(rayjob_status: dict[str, Any] | None) -> Outcome:
    """Map a KubeRay RayJob status to the attempt's state. A failed submission or cluster (``jobDeploymentStatus``
    Failed, e.g. a deadline or a validation failure) counts as a failure even when Ray's job never ran."""
    rs = rayjob_status or {}
    job, deployment = rs.get("jobStatus", ""), rs.get("jobDeploymentStatus", "")
    message = str(rs.get("message", ""))
    if job == "SUCCEEDED":
        return Outcome(SUCCEEDED, "JobSucceeded", message or "the Ray job succeeded")
    if job in JOB_FAILED_STATES or deployment == DEPLOYMENT_FAILED:
        reason = str(rs.get("reason") or ("JobStopped" if job == "STOPPED" else "JobFailed"))
        return Outcome(FAILED, reason, message or f"jobStatus={job or '-'}, jobDeploymentStatus={deployment}")
    if deployment == DEPLOYMENT_COMPLETE:
        # Complete without SUCCEEDED: the job ended in a state we do not know as success.
        return Outcome(FAILED, "JobNotSucceeded", message or f"jobDeploymentStatus=Complete, jobStatus={job or '-'}")
    if job == "RUNNING" or deployment == "Running":
        return Outcome(RUNNING, "JobRunning", message or "the Ray job is running")
    return Outcome(PENDING, "ClusterStarting", message or f"jobDeploymentStatus={deployment or 'New'}")


def open_attempt(attempts: list[dict[str, Any]], number: int, rayjob: str,
                 when: datetime.datetime) -> list[dict[str, Any]]:
    """``attempts`` with attempt ``number`` recorded as started (idempotent: an existing record is kept)."""
    if any(a.get("number") == number for a in attempts):
        return [dict(a) for a in attempts]
    return [*(dict(a) for a in attempts), {"number": number, "rayJob": rayjob, "startTime": stamp(when)}]


def close_attempt(attempts: list[dict[str, Any]], number: int, result: str, reason: str, message: str,
                  when: datetime.datetime) -> list[dict[str, Any]]:
    """``attempts`` with attempt ``number`` ended (its first ending wins: a later observation changes nothing)."""
    out = []
    for a in attempts:
        a = dict(a)
        if a.get("number") == number and "endTime" not in a:
            a.update(endTime=stamp(when), result=result, reason=reason, message=message[:1000])
        out.append(a)
    return out


def restarts_left(attempt: int, max_restarts: int) -> bool:
    """Whether attempt ``attempt`` (1-based) may be followed by another: the first run plus ``max_restarts``."""
    return attempt <= max_restarts


def deadline_exceeded(deadline_seconds: int, attempt_start: str, advanced: str | None,
                      when: datetime.datetime) -> bool:
    """No step advance for ``deadline_seconds`` since the later of the attempt's start and the last advance
    (0 disables the check)."""
    if deadline_seconds <= 0:
        return False
    since = parse_stamp(attempt_start)
    if advanced:
        since = max(since, parse_stamp(advanced))
    return (when - since).total_seconds() > deadline_seconds


def balance_reads(previous: dict[str, Any], max_over_mean: float | None, step: int | None,
                  threshold: float) -> int:
    """Consecutive reads of ``moe/max_over_mean`` above ``threshold``. A read counts once per logged step, so a
    stalled job does not pile up reads of the same value; a value at or under the threshold resets the count."""
    count = int(previous.get("readsOverThreshold", 0))
    if max_over_mean is None:
        return count
    if max_over_mean <= threshold:
        return 0
    if step is not None and step == previous.get("step"):
        return count
    return count + 1


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning ``old`` into ``new`` at the top level (``None`` deletes a key); empty when equal."""
    patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch
