"""``python -m operators`` / ``dlmoe-operator``: run the operator in kopf's standalone mode (no peering CRDs).

The Helm chart relies on this command line: ``[--namespace NS ...] [--all-namespaces] [--liveness URL]``. The
environment supplies ``DLMOE_MLFLOW_TRACKING_URI`` (progress reads for CRs without ``spec.mlflow.trackingUri``) and
``DLMOE_OPERATOR_RESYNC_SECONDS`` (how often each CR is reconciled and its progress read; default 30).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import kopf

from operators import handlers, progress
from operators.reconcile import Reconciler


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dlmoe-operator", description="The dlmoe DiffusionTrainingJob operator.")
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeat for several)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    parser.add_argument("--liveness", default=None, metavar="URL",
                        help="serve a liveness probe, e.g. http://0.0.0.0:8080/healthz")
    return parser.parse_args(argv)


def resync_seconds() -> float:
    text = os.environ.get("DLMOE_OPERATOR_RESYNC_SECONDS", "30")
    try:
        value = float(text)
    except ValueError as exc:
        raise SystemExit(f"DLMOE_OPERATOR_RESYNC_SECONDS must be a number of seconds, got {text!r}") from exc
    if value <= 0:
        raise SystemExit(f"DLMOE_OPERATOR_RESYNC_SECONDS must be positive, got {text!r}")
    return value


def build(resync: float, default_mlflow_uri: str | None) -> kopf.OperatorRegistry:
    """A registry holding the operator's handlers (the tests run the operator from it too)."""
    registry = kopf.OperatorRegistry()
    handlers.register(registry, Reconciler(default_mlflow_uri), resync)
    return registry


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    progress.configure_client()
    registry = build(resync_seconds(), os.environ.get("DLMOE_MLFLOW_TRACKING_URI") or None)
    kopf.run(registry=registry, standalone=True, clusterwide=args.all_namespaces, namespaces=args.namespace,
             liveness_endpoint=args.liveness)
    return 0


if __name__ == "__main__":
    sys.exit(main())
