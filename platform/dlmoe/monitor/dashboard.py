"""``dlmoe dashboard``: a read-only web app over an MLflow tracking store (standard-library HTTP server).

Routes: ``/`` runs list · ``/runs/<run id>[?step=N]`` run page · ``/api/runs/<run id>/expert-load/<step>`` one
step's expert load (JSON, for the slider) · ``/api/runs/<run id>/state`` what changes while a run is live (JSON,
for the auto-refresh) · ``/static/<asset>`` our stylesheet and script · ``/metrics`` Prometheus gauges
(``exporter``) · ``/healthz`` liveness. An unknown run is a
404 page that says so, an unreachable store a 503 page naming it; nothing is ever a stack trace.
"""

from __future__ import annotations

import json
import os
import re
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from dlmoe.monitor import pages
from dlmoe.monitor.exporter import exposition
from dlmoe.monitor.store import Store, StoreUnavailable

ASSETS = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}
RUN_PAGE = re.compile(r"^/runs/([^/]+)/?$")
API_LOAD = re.compile(r"^/api/runs/([^/]+)/expert-load/(\d+)$")
API_STATE = re.compile(r"^/api/runs/([^/]+)/state$")


class Dashboard:
    """The pages and JSON answers of one tracking store; ``respond`` maps a path to (status, type, body)."""

    def __init__(self, store: Store, imbalance_threshold: float = 2.0, refresh_s: float = 10.0) -> None:
        self.store = store
        self.threshold = imbalance_threshold
        self.refresh_s = refresh_s

    def respond(self, target: str) -> tuple[int, str, bytes]:
        url = urlsplit(target)
        path, query = url.path, parse_qs(url.query)
        try:
            if path == "/healthz":
                return HTTPStatus.OK, "text/plain; charset=utf-8", b"ok\n"
            if path == "/metrics":
                return HTTPStatus.OK, CONTENT_TYPE_LATEST, exposition(self.store, self.threshold)
            if path.startswith("/static/"):
                return self._asset(path.removeprefix("/static/"))
            if path in ("/", "/runs", "/runs/"):
                return self._html(pages.runs_page(self.store.runs(), self.store.uri, self.threshold, self.refresh_s))
            if match := RUN_PAGE.match(path):
                step = query.get("step", [""])[0]
                return self._run_page(match.group(1), int(step) if step.isdigit() else None)
            if match := API_LOAD.match(path):
                return self._load_json(match.group(1), int(match.group(2)))
            if match := API_STATE.match(path):
                return self._state_json(match.group(1))
        except StoreUnavailable as exc:
            if path.startswith("/api/"):
                return self._json({"error": str(exc)}, HTTPStatus.SERVICE_UNAVAILABLE)
            return self._html(pages.error_page("Tracking store unreachable", str(exc)),
                              HTTPStatus.SERVICE_UNAVAILABLE)
        return self._html(pages.error_page("Not found", f"There is no page at {path}."), HTTPStatus.NOT_FOUND)

    def _run_page(self, run_id: str, step: int | None) -> tuple[int, str, bytes]:
        run = self.store.run(run_id)
        if run is None:
            return self._unknown_run(run_id, html=True)
        series = self.store.expert_load(run_id)
        loss = {key: self.store.history(run_id, key) for key in ("loss", "val_loss")}
        imbalance = {f"layer {layer}": self.store.history(run_id, f"moe/layer{layer}/max_over_mean")
                     for layer in run.layers}
        return self._html(pages.run_page(
            run, artifacts=series.by_step, warnings=series.warnings, selected=step,
            loss={k: v for k, v in loss.items() if v}, imbalance=imbalance, threshold=self.threshold,
            refresh_s=self.refresh_s))

    def _load_json(self, run_id: str, step: int) -> tuple[int, str, bytes]:
        if self.store.run(run_id) is None:
            return self._unknown_run(run_id, html=False)
        artifact = self.store.expert_load(run_id).by_step.get(step)
        if artifact is None:
            return self._json({"error": f"run {run_id} has no readable expert-load artifact at step {step}"},
                              HTTPStatus.NOT_FOUND)
        return self._json(artifact.to_json())

    def _state_json(self, run_id: str) -> tuple[int, str, bytes]:
        run = self.store.run(run_id)
        if run is None:
            return self._unknown_run(run_id, html=False)
        steps = sorted(self.store.expert_load(run_id).by_step)
        return self._json({"status": run.status, "step": run.step, "signature": pages.signature(run, steps)})

    def _unknown_run(self, run_id: str, *, html: bool) -> tuple[int, str, bytes]:
        message = f"No run with id '{run_id}' in the tracking store at {self.store.uri}."
        if html:
            return self._html(pages.error_page("Unknown run", message), HTTPStatus.NOT_FOUND)
        return self._json({"error": message}, HTTPStatus.NOT_FOUND)

    @staticmethod
    def _asset(name: str) -> tuple[int, str, bytes]:
        if name not in ASSETS:
            return HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", f"no asset {name}\n".encode()
        return HTTPStatus.OK, ASSETS[name], resources.files("dlmoe.monitor").joinpath("static", name).read_bytes()

    @staticmethod
    def _html(page: str, status: int = HTTPStatus.OK) -> tuple[int, str, bytes]:
        return status, "text/html; charset=utf-8", page.encode()

    @staticmethod
    def _json(data: Any, status: int = HTTPStatus.OK) -> tuple[int, str, bytes]:
        return status, "application/json", json.dumps(data).encode()


def make_server(dashboard: Dashboard, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server answering with ``dashboard``; ``port`` 0 picks a free one (``server.server_address``)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "dlmoe-dashboard"

        def do_GET(self) -> None:
            status, kind, body = dashboard.respond(self.path)
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            if os.environ.get("DLMOE_DASHBOARD_ACCESS_LOG"):
                super().log_message(format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve(uri: str, host: str, port: int, imbalance_threshold: float, refresh_s: float = 10.0) -> None:
    """Serve the dashboard of the store at ``uri`` until interrupted."""
    # A dashboard should say "unreachable" within seconds, not after MLflow's minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    server = make_server(Dashboard(Store(uri), imbalance_threshold, refresh_s), host, port)
    bound_host, bound_port = server.server_address[:2]
    print(f"dlmoe dashboard: http://{bound_host!s}:{bound_port} over the MLflow tracking store {uri}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
