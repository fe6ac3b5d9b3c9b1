"""The service's own ``/metrics`` and request-latency histogram, in place of BentoML's.

BentoML's metrics middleware (``metrics={"enabled": True}``, the default) costs a sizeable share of
every request (``docs/benchmarks.md``, "Serving"): it is switched off in ``service.py``, and this
ASGI middleware does the two things of it that the platform uses, with less work per request:

- ``GET /metrics``: the Prometheus exposition of every metric of the process (or, under
  ``PROMETHEUS_MULTIPROC_DIR``, which ``bentoml serve`` sets, of every worker of the service);
- ``recsys_http_request_duration_seconds{endpoint, status}``: one histogram per route and status
  class, the source of the request rate, error rate and latency PromQL of the README, the Grafana
  dashboard and the alert rules; ``recsys_http_requests_in_progress{endpoint}`` for autoscaling on
  in-flight requests.

Only the service's own routes are labels (anything else is ``other``), so no client can grow the
number of series. Written by hand: prometheus_client's ASGI app serves the exposition but does not
time requests, and the OpenTelemetry or Starlette exporters on the package index bring the per-request
cost back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import prometheus_client
from prometheus_client import multiprocess

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

# The request latency is the canary's guardrail and the SLO (25 ms p99): fine buckets below 50 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
UNTIMED = frozenset({"/metrics", "/livez", "/healthz", "/readyz"})

REQUEST_SECONDS = prometheus_client.Histogram(
    name="recsys_http_request_duration_seconds",
    documentation="HTTP request handling time per route and status class (2xx, 4xx, 5xx)",
    labelnames=["endpoint", "status"], buckets=LATENCY_BUCKETS,
)  # fmt: skip
IN_PROGRESS = prometheus_client.Gauge(
    name="recsys_http_requests_in_progress", documentation="HTTP requests being handled, per route",
    labelnames=["endpoint"], multiprocess_mode="livesum",
)  # fmt: skip


def exposition() -> tuple[bytes, str]:
    """The metrics text and its content type: all workers' when the multiprocess directory is set."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = prometheus_client.REGISTRY
    return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST


class RequestMetrics:
    """ASGI middleware: serves ``GET /metrics`` and times the requests of ``endpoints``."""

    def __init__(self, app: ASGIApp, endpoints: Iterable[str]) -> None:
        self.app = app
        self.endpoints = frozenset(endpoints)
        # Label children resolved once: .labels() hashes and locks on every call.
        self._in_progress = {e: IN_PROGRESS.labels(endpoint=e) for e in (*self.endpoints, "other")}
        self._seconds: dict[tuple[str, str], Any] = {}

    def _histogram(self, endpoint: str, status: str):
        child = self._seconds.get((endpoint, status))
        if child is None:
            child = self._seconds[endpoint, status] = REQUEST_SECONDS.labels(endpoint=endpoint, status=status)
        return child

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == "/metrics" and scope["method"] in ("GET", "HEAD"):
            body, content_type = exposition()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", content_type.encode()),
                                    (b"content-length", str(len(body)).encode())]})  # fmt: skip
            await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})
            return
        if path in UNTIMED:
            await self.app(scope, receive, send)
            return
        endpoint = path if path in self.endpoints else "other"
        status = "5xx"  # unless the app answers: an exception or a dropped connection is a server error

        async def send_with_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = f"{message['status'] // 100}xx"
            await send(message)

        in_progress = self._in_progress[endpoint]
        in_progress.inc()
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self._histogram(endpoint, status).observe(time.perf_counter() - started)
            in_progress.dec()
