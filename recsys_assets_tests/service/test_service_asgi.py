"""The service's HTTP contract through its ASGI app (no network), with a real registry and warehouse."""

from __future__ import annotations

import time

import pytest
from starlette.testclient import TestClient

from recsys_assets_tests.service.conftest import ADMIN_TOKEN
from recsys_core.warehouse import Warehouse

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def service_env(serving_home):
    """The service's environment for the whole module: BentoML registers its metrics once per process,
    so one ASGI app serves every test here (a test that changes the canary plan restores it)."""
    import os

    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith("RECSYS_") or name in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "BENTOML_HOME"):
            del os.environ[name]
    os.environ.update(serving_home.env)
    try:
        yield serving_home
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def client(service_env):
    from serving.service import Recommender

    with TestClient(Recommender.to_asgi()) as c:
        yield c


def test_recommend_follows_the_contract(client, service_env) -> None:
    response = client.post("/recommend", json={"user_id": service_env.known_user, "k": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {
        "user_id",
        "items",
        "model_version",
        "variant",
        "fallback",
        "personalised_from_history",
        "request_id",
    }
    assert len(body["items"]) == 7
    assert set(body["items"][0]) == {"track_id", "artist_id", "score", "model_version", "variant"}
    assert {(item["variant"], item["model_version"]) for item in body["items"]} == {
        (body["variant"], body["model_version"])
    }
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert body["fallback"] is False
    assert (body["variant"], body["model_version"]) in {("champion", 1), ("challenger", 2)}


def test_already_heard_tracks_are_excluded(client, service_env) -> None:
    from recsys_core.model_version import ModelArtifact

    body = client.post("/recommend", json={"user_id": service_env.known_user, "k": 20}).json()
    artifact = ModelArtifact.load(service_env.registry.download(body["model_version"]))
    heard = {str(artifact.item_ids[i]) for i in artifact.seen(artifact.user_row(service_env.known_user))}
    assert heard
    assert not heard & {item["track_id"] for item in body["items"]}


def test_unknown_users_get_the_popularity_fallback_flagged(client) -> None:
    body = client.post("/recommend", json={"user_id": "someone-new", "k": 5}).json()
    assert body["fallback"] is True
    assert len(body["items"]) == 5


def test_the_variant_is_sticky_per_user(client) -> None:
    variants = {client.post("/recommend", json={"user_id": "sticky-user"}).json()["variant"] for _ in range(5)}
    assert len(variants) == 1


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"user_id": "u", "k": 0}, "k"),
        ({"user_id": "u", "k": 101}, "k"),
        ({"user_id": "u", "k": "ten"}, "k"),
        ({"user_id": "", "k": 5}, "user_id"),
        ({"user_id": "x" * 129}, "user_id"),
        ({"k": 5}, "user_id"),
        ({"user_id": 12345}, "user_id"),
        ({"user_id": "u", "k": "10"}, "k"),  # strict: a string is not a number
        ({"user_id": "u", "k": True}, "k"),  # nor is a boolean
        ({"user_id": "u\u0000x", "k": 5}, "user_id"),  # no control characters in ids
        ({"user_id": "u\nforged log line", "k": 5}, "user_id"),
    ],
)
def test_bad_recommend_input_is_a_4xx_naming_the_field(client, payload, fragment) -> None:
    response = client.post("/recommend", json=payload)
    assert 400 <= response.status_code < 500, response.text
    assert fragment in response.text


def test_malformed_json_is_a_4xx(client) -> None:
    response = client.post("/recommend", content=b"{not json", headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500


def test_feedback_is_accepted_and_lands_in_the_warehouse(client, service_env) -> None:
    response = client.post(
        "/feedback",
        json={
            "user_id": "feedback-user",
            "track_id": "t0000001",
            "event_type": "click",
            "model_version": 1,
            "variant": "champion",
        },
    )
    assert response.status_code == 202, response.text
    event_id = response.json()["event_id"]
    client.post("/recommend", json={"user_id": "feedback-user", "k": 3})
    warehouse = Warehouse(service_env.env["RECSYS_WAREHOUSE_URI"])
    deadline = time.monotonic() + 20
    rows = None
    while time.monotonic() < deadline:
        warehouse.init_schema()
        rows = warehouse.fetch(
            "SELECT event_id, event_type, source, model_version, variant FROM listening_events"
            " WHERE user_id = 'feedback-user'"
        )
        if rows.height >= 4:
            break
        time.sleep(0.3)
    assert rows is not None
    kinds = rows["event_type"].value_counts().sort("event_type").rows()
    assert kinds == [("click", 1), ("impression", 3)]
    click = rows.filter(rows["event_id"] == event_id).row(0, named=True)
    assert (click["source"], click["model_version"], click["variant"]) == ("recommendation", "1", "champion")


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"user_id": "u", "track_id": "t", "event_type": "teleport"}, "event_type='teleport'"),
        ({"user_id": "u", "track_id": "t", "event_type": "click", "variant": "blue"}, "variant='blue'"),
        ({"user_id": "u", "event_type": "click"}, "track_id"),
        ({"user_id": "u", "track_id": "t", "event_type": "click", "model_version": "v1"}, "model_version"),
        ({"user_id": "u", "track_id": "t", "event_type": "click", "model_version": -1}, "model_version"),
        ({"user_id": "u", "track_id": "t", "event_type": "click", "model_version": 10**30}, "model_version"),
        ({"user_id": "u", "track_id": "t\u0000", "event_type": "click"}, "track_id"),
    ],
)
def test_bad_feedback_is_a_4xx_naming_the_field(client, payload, fragment) -> None:
    response = client.post("/feedback", json=payload)
    assert 400 <= response.status_code < 500, response.text
    assert fragment in response.text


def test_health_and_openapi(client) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    spec = client.get("/docs.json").json()
    assert {"/recommend", "/feedback", "/admin/reload", "/admin/canary"} <= set(spec["paths"])
    # The service only reads the registry: moves are the control plane's (recsys model …, Dagster).
    assert not {"/admin/promote", "/admin/rollback"} & set(spec["paths"])


def test_counters_move_per_variant_and_version(client) -> None:
    # /metrics itself needs `bentoml serve`'s multiprocess directory: the integration test reads it.
    import prometheus_client

    def sample(name: str, **labels: str) -> float:
        return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0

    body = client.post("/recommend", json={"user_id": "metrics-user", "k": 4}).json()
    labels = {"model_version": str(body["model_version"]), "variant": body["variant"]}
    before = sample("recsys_impressions_total", **labels)
    client.post("/recommend", json={"user_id": "metrics-user", "k": 4})
    assert sample("recsys_impressions_total", **labels) == before + 4
    clicks = sample("recsys_feedback_total", **labels, event_type="click")
    client.post("/feedback", json={"user_id": "metrics-user", "track_id": "t", "event_type": "click",
                                   "model_version": body["model_version"], "variant": body["variant"]})  # fmt: skip
    assert sample("recsys_feedback_total", **labels, event_type="click") == clicks + 1


def test_feedback_versions_are_bounded_as_metric_labels(client) -> None:
    """Any version a client sends that is not served is counted as `other`: unauthenticated input does
    not grow the number of series (3,000 distinct values made 3,005 series)."""
    for version in range(1000, 1050):
        sent = client.post("/feedback", json={"user_id": "u", "track_id": "t", "event_type": "skip",
                                              "model_version": version, "variant": "champion"})  # fmt: skip
        assert sent.status_code == 202, sent.text
    import prometheus_client

    versions = {
        s.labels["model_version"]
        for metric in prometheus_client.REGISTRY.collect()
        if metric.name == "recsys_feedback"
        for s in metric.samples
    }
    assert "other" in versions
    assert not versions & {str(v) for v in range(1000, 1050)}


def test_a_non_ascii_authorization_header_is_a_401(client) -> None:
    response = client.post("/admin/canary", json={}, headers={"Authorization": "Bearer é".encode("latin-1")})
    assert response.status_code == 401


def test_admin_endpoints_need_the_token(client) -> None:
    assert client.post("/admin/canary", json={}).status_code == 401
    assert client.post("/admin/canary", json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    response = client.post("/admin/canary", json={}, headers=AUTH)
    assert response.status_code == 200, response.text
    expected = {"fraction": 0.5, "mode": "ab", "step": 0, "champion_version": 1, "challenger_version": 2}
    assert response.json() == expected


def test_interleaving_gives_canary_users_one_list_from_both_models(client, service_env) -> None:
    """With the registry's canary in interleaving mode, a canary user gets one team-draft list whose items
    each name the model that picked them; the impressions land per item."""
    registry = service_env.registry
    registry.set_canary(2, step=0, fraction=1.0, mode="interleaving", reason="test", by="tests")
    try:
        client.post("/admin/reload", json={}, headers=AUTH)
        body = client.post("/recommend", json={"user_id": service_env.known_user, "k": 10}).json()
        assert body["variant"] == "interleaved"
        teams = [(item["variant"], item["model_version"]) for item in body["items"]]
        assert set(teams) <= {("champion", 1), ("challenger", 2)}
        assert abs(teams.count(("champion", 1)) - teams.count(("challenger", 2))) <= 1
        assert len({item["track_id"] for item in body["items"]}) == 10
        warehouse = Warehouse(service_env.env["RECSYS_WAREHOUSE_URI"])
        deadline = time.monotonic() + 30
        landed = 0
        while landed < 10 and time.monotonic() < deadline:
            time.sleep(0.3)
            landed = warehouse.scalar(
                "SELECT COUNT(*) FROM listening_events WHERE event_id LIKE ?", [f"imp-{body['request_id']}-%"]
            )
        rows = warehouse.fetch(
            "SELECT variant, model_version FROM listening_events WHERE event_id LIKE ?", [f"imp-{body['request_id']}-%"]
        )
        assert sorted(rows.iter_rows()) == sorted((v, str(m)) for v, m in teams)
    finally:
        registry.set_canary(2, step=0, fraction=0.5, mode="ab", reason="test restored", by="tests")
        client.post("/admin/reload", json={}, headers=AUTH)


def test_readiness_fails_when_the_registry_poll_stops(client) -> None:
    """A background loop that stops makes /readyz say so (the service would otherwise go on serving
    versions the registry no longer names, with no signal)."""
    from serving.service import Recommender

    assert client.get("/readyz").status_code == 200
    service = next(s for s in _instances(Recommender.inner) if s.slots.alive)
    service.slots.close()
    try:
        assert client.get("/readyz").status_code == 503
    finally:
        service.slots.start(3600)  # started again
    assert client.get("/readyz").status_code == 200


def _instances(cls) -> list:
    """The live instances of ``cls`` (the ASGI app keeps its service instance private)."""
    import gc

    gc.unfreeze()  # the service freezes what it loaded at start-up; get_objects() skips frozen objects
    return [o for o in gc.get_objects() if isinstance(o, cls)]


def test_bodies_over_the_limit_are_a_413_and_multipart_a_415(client, service_env) -> None:
    big = {"user_id": service_env.known_user, "k": 5, "padding": "x" * 70_000}
    assert client.post("/recommend", json=big).status_code == 413
    no_boundary = client.post("/feedback", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    assert no_boundary.status_code == 415
    assert "multipart" in no_boundary.json()["error"]
    assert client.post("/recommend", json={"user_id": service_env.known_user, "k": 5}).status_code == 200


def test_client_errors_are_logged_at_info_without_a_traceback(client, caplog) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="bentoml._internal.server.http_app"):
        assert client.post("/recommend", json={"user_id": "u", "k": 0}).status_code == 400
        assert client.post("/feedback", json={"user_id": "u", "track_id": "t", "event_type": "x"}).status_code == 400
    records = [r for r in caplog.records if r.name == "bentoml._internal.server.http_app"]
    assert len(records) == 2
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in records)
    assert "ValidationError" in records[0].getMessage()
    assert "event_type='x'" in records[1].getMessage()


# --- the OpenAPI document against the service: schemathesis, bounded in examples --------------------


def test_the_openapi_document_is_what_the_service_does(client) -> None:
    """Every operation, valid and invalid inputs generated from the document (schemathesis, a bounded
    number of examples each): no 5xx, and every answer (status, content type, body) is one that the
    document declares. The requests go through this module's app (schemathesis's own ASGI transport
    would run the app's lifespan once per case)."""
    import schemathesis  # the serving test environment has it (serving/requirements-test.txt)
    from hypothesis import HealthCheck, given, settings
    from schemathesis.specs.openapi.checks import ignored_auth

    schema = schemathesis.openapi.from_dict(client.get("/docs.json").json())
    tried = []
    for result in schema.get_all_operations():
        operation = result.ok()
        auth = AUTH if operation.path.startswith("/admin") else {}

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def fuzz(case) -> None:
            sent = case.as_transport_kwargs(base_url="http://testserver", headers=auth)  # noqa: B023  (run at once)
            body = {k: sent[k] for k in ("json", "data", "content") if sent.get(k) is not None}
            response = client.request(sent["method"], sent["url"], headers=sent.get("headers"),
                                      params=sent.get("params"), **body)  # fmt: skip
            # ignored_auth re-sends the request over the network without the token: asserted below instead.
            case.validate_response(response, headers=sent.get("headers"), excluded_checks=[ignored_auth])
            tried.append(case.path)

        fuzz()
    assert {"/recommend", "/feedback", "/admin/reload", "/admin/canary"} <= set(tried)


def test_the_document_states_the_real_statuses(client) -> None:
    document = client.get("/docs.json").json()
    paths = document["paths"]
    assert set(paths["/feedback"]["post"]["responses"]) == {"202", "400", "413", "415", "503"}  # 503: a full log disk
    assert {"401", "400"} <= set(paths["/admin/reload"]["post"]["responses"])
    assert "503" in paths["/recommend"]["post"]["responses"]
    for route in ("/admin/reload", "/admin/canary"):  # what schemathesis's ignored_auth check would send
        assert client.post(route, json={}).status_code == 401
    schemas = document["components"]["schemas"]
    assert any(s.get("properties", {}).get("event_type", {}).get("enum") for s in schemas.values())


@pytest.mark.parametrize(
    "body",
    [
        b'{"user_id": "u3", "k": 4}',
        b'{"user_id": "someone-new", "k": 3}',
        b'{"user_id": "u3", "k": 0}',
        b'{"user_id": "u3", "k": "10"}',
        b'{"k": 5}',
        b'{"user_id": "u\\u0000", "k": 5}',
        b"not json",
        b"",
    ],
)
def test_the_fast_path_answers_what_bentoml_answers(client, body: bytes) -> None:
    """serving/fastpath.py against BentoML's own request path: same status, same body (the request id
    and, for an A/B user, nothing else differs)."""
    from serving import fastpath

    def answer() -> tuple[int, object]:
        response = client.post("/recommend", content=body, headers={"content-type": "application/json"})
        payload = response.json()
        if isinstance(payload, dict):
            payload.pop("request_id", None)
            for error in payload.get("detail", []) if isinstance(payload.get("detail"), list) else []:
                error.pop("url", None)
        return response.status_code, payload

    fast = answer()
    function = fastpath._BOUND.pop("/recommend")
    try:
        slow = answer()
    finally:
        fastpath.bind("/recommend", function)
    assert fast == slow
