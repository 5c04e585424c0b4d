"""The kopf handlers: thin entry points that run one reconciliation pass (operators/reconcile.py) each.

They are registered on a given registry rather than kopf's global one, so the CLI and the tests build an operator
with their own settings (resync interval, default MLflow URI) and several can run one after another in one process.
Handlers are sync: kopf runs them in its thread pool, where the blocking Kubernetes and MLflow clients belong.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from operators import kube
from operators import render as r
from operators.reconcile import InvalidSpec, NotReady, Reconciler


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings that keep the operator inside the chart's RBAC and the CRD's schema."""
    # Handler progress and the last-handled spec go to annotations: the structural status schema would prune
    # kopf's own status fields.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=r.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=r.GROUP)
    settings.persistence.finalizer = f"{r.GROUP}/finalizer"
    # No CRD or namespace watching: the RBAC grants neither, and the resources are known at start.
    settings.scanning.disabled = True
    # Our own Events tell the story; kopf's per-handler INFO logs would bury them.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = r.MANAGED_BY
    # A deleted CR keeps its finalizer until its resync timer has exited; kopf rechecks a sync timer that was
    # mid-pass only every `cancellation_polling` seconds (60 by default), which would hold deletions for a minute.
    settings.background.cancellation_polling = 1.0
    # Watch streams end and restart every few minutes: a connection dropped silently (a load balancer, an API
    # server restart) would otherwise leave the operator waiting for events that never come.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


def _namespaced(namespace: str | None) -> str:
    # Both resources are namespaced (the CRD's scope, KubeRay's RayJob); kopf types the field for cluster scope too.
    assert namespace is not None, "a namespaced resource arrived without a namespace"
    return namespace


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler, resync_seconds: float) -> None:
    """Register every handler of the operator on ``registry``."""

    def _pass(namespace: str, name: str, logger: kopf.Logger) -> None:
        # The timer and the watch retry by running again on their own schedule, so a job that cannot progress
        # is not an error for them: its status condition and Event already say why. (Raising here would make
        # kopf postpone the timer by the error's delay instead of the resync interval.)
        try:
            reconciler.reconcile(namespace, name)
        except (InvalidSpec, NotReady) as exc:
            logger.info(f"{namespace}/{name} waits: {exc}")

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # A registry of our own has none of kopf's implicit logins; kopf logs in with the credentials the
        # kubernetes client uses for operators/kube.py.
        return kube.connection_info()

    @kopf.on.create(r.GROUP, r.VERSION, r.PLURAL, registry=registry)
    @kopf.on.resume(r.GROUP, r.VERSION, r.PLURAL, registry=registry)
    @kopf.on.update(r.GROUP, r.VERSION, r.PLURAL, field="spec", registry=registry)
    def changed(namespace: str | None, name: str, **_: Any) -> None:
        try:
            reconciler.reconcile(_namespaced(namespace), name)
        except InvalidSpec as exc:
            raise kopf.PermanentError(str(exc)) from exc
        except NotReady as exc:
            raise kopf.TemporaryError(str(exc), delay=exc.delay) from exc

    @kopf.timer(r.GROUP, r.VERSION, r.PLURAL, interval=resync_seconds, registry=registry)
    def resync(namespace: str | None, name: str, logger: kopf.Logger, **_: Any) -> None:
        _pass(_namespaced(namespace), name, logger)

    @kopf.on.event(r.RAY_GROUP, r.RAY_VERSION, r.RAY_PLURAL, labels={"app.kubernetes.io/managed-by": r.MANAGED_BY},
                   registry=registry)
    def rayjob_changed(namespace: str | None, labels: kopf.Labels, logger: kopf.Logger, **_: Any) -> None:
        job = labels.get(r.LABEL_JOB)
        if job:
            _pass(_namespaced(namespace), job, logger)

    @kopf.on.delete(r.GROUP, r.VERSION, r.PLURAL, registry=registry)
    def deleted(namespace: str | None, name: str, **_: Any) -> None:
        # Owner references make the garbage collector do the same; deleting explicitly also covers clusters
        # (and the emulator) where it lags or is absent, and the finalizer holds the CR until it is done.
        namespace = _namespaced(namespace)
        for rayjob in kube.rayjobs_of(namespace, name):
            kube.delete_rayjob(namespace, rayjob)
        kube.delete_configmap(namespace, r.configmap_name(name))
        reconciler.forget(namespace, name)
