"""The deployment assets against a real `bentoml serve`: build the Bento, deploy it, and let the canary
analysis promote a challenger whose feedback is clearly better, or roll back one that answers slowly."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import httpx
import pytest

from recsys_assets.defs.deployment import assets as deployment
from recsys_assets.resources import build_resources
from recsys_assets_tests.conftest import REPO_ROOT
from recsys_cli.stack.services import bento_spec
from recsys_cli.stack.supervisor import Stack, free_port
from recsys_core.registry import CHALLENGER, CHAMPION
from recsys_core.settings import load_settings
from recsys_core.warehouse import Warehouse

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def copied_home(serving_home, tmp_path: Path, monkeypatch, **extra: str):
    """A copy of the session's registry (champion v1, challenger v2 in canary), its environment exported."""
    home = tmp_path / "home"
    shutil.copytree(serving_home.home, home, ignore=shutil.ignore_patterns("warehouse.duckdb*", "serving"))
    settings = load_settings({"RECSYS_HOME": str(home), "RECSYS_BENTO_PORT": str(free_port())})
    env = {**serving_home.env, **settings.child_env({}), **extra}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return settings, env


def test_bento_deploy_and_canary_promotion(serving_home, tmp_path: Path, monkeypatch) -> None:
    settings, env = copied_home(serving_home, tmp_path, monkeypatch, RECSYS_CANARY_STEPS="0.5")
    home = settings.home
    stack = Stack(tmp_path / "run", env=env, cwd=REPO_ROOT)
    stack.start([bento_spec(settings)], timeout=180)
    try:
        assets = [deployment.recommender_bento, deployment.model_deployment, deployment.canary_analysis]
        with dg.instance_for_test() as instance:
            result = dg.materialize(
                assets,
                instance=instance,
                resources=build_resources(settings),
                selection=["recommender_bento", "model_deployment"],
            )
            assert result.success
            bento = result.output_for_node("recommender_bento")
            assert bento["champion"] == 1
            assert bento["challenger"] == 2
            assert bento["tag"].startswith("recommender:")
            deployed = result.output_for_node("model_deployment")
            assert deployed["served"] == {
                "fraction": 0.5, "mode": "ab", "step": 0, "champion_version": 1, "challenger_version": 2
            }  # fmt: skip
            manifests = Path(deployed["manifests"]).read_text()
            assert f'image: "{deployed["image"]}"' in manifests

            # Traffic: the challenger's users click a lot more than the champion's.
            client = httpx.Client(base_url=settings.url("bento"), timeout=10)
            for i in range(400):
                body = client.post("/recommend", json={"user_id": f"u-{i}", "k": 10}).json()
                clicks = 4 if body["variant"] == "challenger" else i % 3
                for item in body["items"][:clicks]:
                    feedback = {"user_id": f"u-{i}", "track_id": item["track_id"], "event_type": "click"}
                    client.post("/feedback", json={**feedback, "model_version": body["model_version"],
                                                   "variant": body["variant"]})  # fmt: skip
            warehouse = Warehouse(settings.warehouse_uri)
            import time

            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                warehouse.init_schema()
                if warehouse.scalar("SELECT COUNT(*) FROM listening_events WHERE event_type = 'click'") >= 1000:
                    break
                time.sleep(0.5)

            analysis = dg.materialize(
                assets,
                instance=instance,
                resources=build_resources(settings),
                selection=["canary_analysis"],
                run_config={"ops": {"canary_analysis": {"config": {"min_impressions": 1000}}}},
            )
            assert analysis.success
            (event,) = analysis.asset_materializations_for_node("canary_analysis")
            assert event.metadata["action"].value == "promote", event.metadata["decision"].value
            assert event.metadata["decision"].value.startswith("ctr significantly higher")
            assert event.metadata["health_source"].value == "the service's /metrics"
        registry = serving_home.registry.__class__(
            settings.mlflow_tracking_uri, settings.mlflow_artifacts_dir, home / "cache"
        )
        assert registry.by_alias(CHAMPION).version == 2
        assert registry.by_alias(CHALLENGER) is None
        assert registry.get(2).history[-1]["by"].startswith("canary_analysis")
        served = client.post("/recommend", json={"user_id": "u-1", "k": 3}).json()
        assert (served["variant"], served["model_version"]) == ("champion", 2)
    finally:
        stack.stop(grace=20)


def test_a_slow_challenger_is_rolled_back_by_the_latency_guardrail(serving_home, tmp_path: Path, monkeypatch) -> None:
    """The challenger answers 40 ms late (the fault knob): the sensor asks for an analysis at once and the
    analysis rolls it back on the guardrail, before any CTR evidence, with the reason recorded."""
    from recsys_assets.definitions import defs

    settings, env = copied_home(
        serving_home, tmp_path, monkeypatch, RECSYS_FAULT_CHALLENGER_DELAY_MS="40", RECSYS_CANARY_MIN_REQUESTS="50"
    )
    stack = Stack(tmp_path / "run", env=env, cwd=REPO_ROOT)
    stack.start([bento_spec(settings)], timeout=180)
    try:
        client = httpx.Client(base_url=settings.url("bento"), timeout=10)
        variants = [client.post("/recommend", json={"user_id": f"u-{i}", "k": 10}).json()["variant"]
                    for i in range(240)]  # fmt: skip
        assert min(variants.count("champion"), variants.count("challenger")) >= 50
        with dg.instance_for_test() as instance:
            resources = build_resources(settings)
            with dg.build_sensor_context(instance=instance, resources=resources) as context:
                request = defs().resolve_sensor_def("canary_sensor")(context)
            assert request.run_key == "canary:v2:guardrail"
            analysis = dg.materialize(
                [deployment.canary_analysis], instance=instance, resources=resources, selection=["canary_analysis"]
            )
        (event,) = analysis.asset_materializations_for_node("canary_analysis")
        assert event.metadata["action"].value == "rollback"
        assert event.metadata["decision"].value.startswith("guardrail: latency p99"), event.metadata["decision"].value
        registry = serving_home.registry.__class__(
            settings.mlflow_tracking_uri, settings.mlflow_artifacts_dir, settings.home / "cache"
        )
        assert registry.by_alias(CHALLENGER) is None
        assert registry.by_alias(CHAMPION).version == 1
        last = registry.get(2).history[-1]
        assert last["action"] == "challenger rolled back"
        assert last["reason"].startswith("guardrail: latency p99")
        assert client.post("/recommend", json={"user_id": "u-1", "k": 3}).json()["variant"] == "champion"
    finally:
        stack.stop(grace=20)
