"""`bentoml serve` for real on loopback: canary split, promotion under load with no failed request,
rollback, and the counters on /metrics."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pandas as pd
import psutil
import pytest

from recsys_assets_tests.conftest import REPO_ROOT
from recsys_assets_tests.serving.conftest import ADMIN_TOKEN
from recsys_cli.stack.services import bento_spec
from recsys_cli.stack.supervisor import Stack, free_port
from recsys_core.control import ControlPlane
from recsys_core.settings import load_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def server(serving_home, tmp_path: Path):
    """A real `bentoml serve` on a copy of the session's registry (this test changes the aliases)."""
    home = tmp_path / "home"
    shutil.copytree(serving_home.home, home, ignore=shutil.ignore_patterns("warehouse.duckdb*", "serving"))
    settings = load_settings({"RECSYS_HOME": str(home), "RECSYS_BENTO_PORT": str(free_port())})
    env = {**serving_home.env, **settings.child_env({})}
    stack = Stack(tmp_path / "run", env=env, cwd=REPO_ROOT)
    stack.start([bento_spec(settings)], timeout=180)
    try:
        yield settings.url("bento"), stack, ControlPlane(settings.mlflow_tracking_uri, settings.mlflow_artifacts_dir,
                                                         home / "control-cache")  # fmt: skip
    finally:
        pids = stack.all_pids()
        stack.stop(grace=20)
        assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_canary_promotion_under_load_rollback_and_metrics(server) -> None:
    url, _, control = server
    client = httpx.Client(base_url=url, timeout=10)

    # The canary split: 2,000 users, 30% challenger, within ±5 points; sticky per user.
    control.set_canary(2, step=0, fraction=0.3, mode="ab", reason="integration test", by="test")
    assert client.post("/admin/reload", json={}, headers=AUTH).status_code == 200
    assert client.post("/admin/canary", json={}, headers=AUTH).json()["fraction"] == 0.3
    variants = {}
    for i in range(2000):
        body = client.post("/recommend", json={"user_id": f"canary-{i}", "k": 3}).json()
        variants[f"canary-{i}"] = (body["variant"], body["model_version"])
    share = sum(v == "challenger" for v, _ in variants.values()) / len(variants)
    assert abs(share - 0.3) <= 0.05, share
    assert {v for v in variants.values()} == {("champion", 1), ("challenger", 2)}
    again = client.post("/recommend", json={"user_id": "canary-7", "k": 3}).json()
    assert (again["variant"], again["model_version"]) == variants["canary-7"]

    # Load from two threads while the challenger is promoted: not one request may fail.
    outcomes: Counter = Counter()
    served: Counter = Counter()
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(base_url=url, timeout=10) as c:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    r = c.post("/recommend", json={"user_id": f"load-{worker}-{n % 500}", "k": 10})
                except httpx.HTTPError as exc:
                    outcomes[type(exc).__name__] += 1
                    continue
                outcomes[r.status_code] += 1
                if r.status_code == 200:
                    body = r.json()
                    served[(body["variant"], body["model_version"])] += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    time.sleep(3)
    control.promote(reason="integration test", by="test")  # the control plane moves; the service follows
    reloaded = client.post("/admin/reload", json={}, headers=AUTH)
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["champion_version"] == 2
    assert reloaded.json()["challenger_version"] is None
    assert set(outcomes) == {200}, outcomes
    assert outcomes[200] > 100
    assert served[("champion", 2)] > 0  # after the swap, everyone gets version 2 as champion
    after = client.post("/recommend", json={"user_id": "canary-7", "k": 3}).json()
    assert (after["variant"], after["model_version"]) == ("champion", 2)

    # Roll back: version 1 is the champion again.
    control.rollback(reason="integration test", by="test")
    rolled = client.post("/admin/reload", json={}, headers=AUTH)
    assert rolled.status_code == 200, rolled.text
    assert rolled.json()["champion_version"] == 1
    assert client.post("/recommend", json={"user_id": "canary-7", "k": 3}).json()["model_version"] == 1

    # Feedback and the counters, per version and variant, on /metrics.
    feedback = client.post(
        "/feedback",
        json={
            "user_id": "canary-7",
            "track_id": "t1",
            "event_type": "click",
            "model_version": 1,
            "variant": "champion",
        },
    )
    assert feedback.status_code == 202
    metrics = client.get("/metrics").text
    assert 'recsys_recommendations_total{fallback="true",model_version="1",variant="champion"}' in metrics
    assert 'recsys_impressions_total{model_version="2",variant="challenger"}' in metrics
    assert 'recsys_feedback_total{event_type="click",model_version="1",variant="champion"}' in metrics
    assert 'recsys_model_reloads_total{reason="admin reload",variant="champion"}' in metrics
    assert 'recsys_request_duration_seconds_bucket{le="0.001",model_version="2",variant="challenger"}' in metrics
    # The service's own request metrics (BentoML's are off), all workers' through the multiprocess directory.
    assert 'recsys_http_request_duration_seconds_bucket{endpoint="/recommend",le="0.025",status="2xx"}' in metrics
    assert 'recsys_http_request_duration_seconds_count{endpoint="/feedback",status="2xx"}' in metrics
    assert "recsys_http_requests_in_progress" in metrics
    assert "bentoml_service_request" not in metrics


def test_one_scorer_offline_top_k_equals_recommend_and_the_pyfunc(server, serving_home) -> None:
    """The offline evaluation's top-10, `/recommend`'s and the registered MLflow pyfunc's are the same
    tracks in the same order for every sampled user: offline metrics describe what is served."""
    import mlflow
    from mlflow import MlflowClient

    from recsys_assets.ml.metrics import build_eval_set, recommend
    from recsys_assets.ml.split import global_temporal_split
    from recsys_assets_tests.ml.conftest import simulated_interactions
    from recsys_core.registry import MODEL_NAME
    from recsys_core.scoring import Ranker

    _, interactions, _ = simulated_interactions(users=120, tracks=400, days=14, seed=21)  # the fixture's world
    split = global_temporal_split(interactions)
    eval_set = build_eval_set(split.train, split.holdout)
    url, _, _ = server
    client = httpx.Client(base_url=url, timeout=10)
    registry = serving_home.registry
    offline, pyfunc = {}, {}
    for version in (1, 2):
        # As model_evaluation scores a version: the same Ranker as the service's.
        top = recommend(Ranker.load(registry.download(version), version).scorer(eval_set.items), eval_set, 10)
        ranked = zip(eval_set.users, top, strict=True)
        offline[version] = {str(u): [str(eval_set.items[j]) for j in row] for u, row in ranked}
        source = MlflowClient(registry.tracking_uri, registry.tracking_uri).get_model_version_download_uri(
            MODEL_NAME, str(version)
        )
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=registry.tracking_uri)
        pyfunc[version] = mlflow.pyfunc.load_model(local)
    users = sorted(offline[1])[:40]
    assert len(users) >= 20
    served_versions = set()
    for user in users:
        body = client.post("/recommend", json={"user_id": user, "k": 10}).json()
        version = body["model_version"]
        served_versions.add(version)
        assert [item["track_id"] for item in body["items"]] == offline[version][user], user
        predicted = pyfunc[version].predict(pd.DataFrame({"user_id": [user], "k": [10]}))
        assert list(predicted["track_ids"][0]) == offline[version][user], user
    assert served_versions == {1, 2}
