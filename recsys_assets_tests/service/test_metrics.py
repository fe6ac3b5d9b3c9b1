"""The service's own request metrics middleware (serving/metrics.py), on a tiny ASGI app."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serving.metrics import RequestMetrics


async def ok(request):
    return JSONResponse({"ok": True})


async def bad(request):
    return JSONResponse({"error": "k"}, status_code=400)


async def boom(request):
    raise RuntimeError("boom")


@pytest.fixture(scope="module")
def client():
    app = Starlette(routes=[Route("/ok", ok, methods=["POST"]), Route("/bad", bad), Route("/boom", boom)])
    app.add_middleware(RequestMetrics, endpoints=["/ok", "/bad", "/boom"])
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def samples(client: TestClient, name: str) -> dict[tuple, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
        if s.name == name
    }


def count(client: TestClient, endpoint: str, status: str) -> float:
    key = (("endpoint", endpoint), ("status", status))
    return samples(client, "recsys_http_request_duration_seconds_count").get(key, 0.0)


def test_requests_are_counted_per_route_and_status_class(client: TestClient) -> None:
    before = {(e, s): count(client, e, s) for e, s in [("/ok", "2xx"), ("/bad", "4xx"), ("/boom", "5xx")]}
    assert client.post("/ok").status_code == 200
    assert client.get("/bad").status_code == 400
    assert client.get("/boom").status_code == 500
    assert count(client, "/ok", "2xx") == before["/ok", "2xx"] + 1
    assert count(client, "/bad", "4xx") == before["/bad", "4xx"] + 1
    assert count(client, "/boom", "5xx") == before["/boom", "5xx"] + 1


def test_unknown_paths_share_one_label(client: TestClient) -> None:
    before = count(client, "other", "4xx")
    for i in range(20):
        client.get(f"/no-such-route-{i}")
    assert count(client, "other", "4xx") == before + 20
    endpoints = {dict(k)["endpoint"] for k in samples(client, "recsys_http_request_duration_seconds_count")}
    assert not any(e.startswith("/no-such-route") for e in endpoints)


def test_nothing_is_left_in_progress(client: TestClient) -> None:
    client.post("/ok")
    in_progress = samples(client, "recsys_http_requests_in_progress")
    assert in_progress[(("endpoint", "/ok"),)] == 0


def test_metrics_and_probes_are_not_timed(client: TestClient) -> None:
    client.get("/metrics")
    client.get("/metrics")
    endpoints = {dict(k)["endpoint"] for k in samples(client, "recsys_http_request_duration_seconds_count")}
    assert "/metrics" not in endpoints
