"""The canary's data: user-level sums by step from the warehouse, serving health from /metrics, and the
traffic plan in the registry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from recsys_assets.ml.kpis import canary_events, canary_strata, histogram_quantile, serving_health_from_metrics
from recsys_assets_tests.service.versions import tiny_version
from recsys_core.control import ControlPlane
from recsys_core.registry import CanaryState, RegistryError
from recsys_core.warehouse import Warehouse

T0 = datetime(2026, 6, 1, tzinfo=UTC)


def state(mode: str = "ab") -> CanaryState:
    return CanaryState(2, mode, 1, 0.2, [
        {"step": 0, "fraction": 0.05, "at": T0.isoformat()},
        {"step": 1, "fraction": 0.2, "at": (T0 + timedelta(hours=1)).isoformat()},
    ])  # fmt: skip


def events(rows: list[tuple]) -> pl.DataFrame:
    """(user, variant, model_version, event_type, minutes after T0)"""
    return pl.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(len(rows))],
            "user_id": [r[0] for r in rows],
            "track_id": ["t"] * len(rows),
            "played_at": [T0 + timedelta(minutes=r[4]) for r in rows],
            "event_type": [r[3] for r in rows],
            "source": ["recommendation"] * len(rows),
            "model_version": [r[2] for r in rows],
            "variant": [r[1] for r in rows],
        }
    )


@pytest.fixture
def warehouse(tmp_path) -> Warehouse:
    w = Warehouse(f"duckdb:///{tmp_path / 'w.duckdb'}")
    w.init_schema()
    return w


def test_events_are_summed_per_user_by_step_and_variant(warehouse: Warehouse) -> None:
    warehouse.land_events(
        events([
            ("a", "champion", "1", "impression", 5), ("a", "champion", "1", "click", 6),
            ("a", "champion", "1", "impression", 70),  # step 1
            ("b", "challenger", "2", "impression", 10), ("b", "challenger", "2", "click", 11),
            ("b", "challenger", "2", "play", 12), ("b", "challenger", "2", "skip", 13),
            ("c", "challenger", "7", "impression", 10),  # another challenger's: not this canary
            ("d", "champion", "1", "impression", -5),  # before the canary started
        ]),
        source="test", origin="t",
    )  # fmt: skip
    frame = canary_events(warehouse, state(), champion=1)
    rows = {(r["step"], r["variant"], r["user_id"]): r for r in frame.iter_rows(named=True)}
    assert set(rows) == {(0, "champion", "a"), (1, "champion", "a"), (0, "challenger", "b")}
    assert (rows[0, "champion", "a"]["impressions"], rows[0, "champion", "a"]["clicks"]) == (1, 1)
    b = rows[0, "challenger", "b"]
    assert (b["impressions"], b["clicks"], b["conversions"], b["rejections"]) == (1, 1, 1, 1)

    strata = canary_strata(frame, state())
    assert [s.step for s in strata] == [0, 1]
    assert (strata[0].champion.users, strata[0].challenger.users) == (1, 1)
    assert strata[1].challenger.users == 0


def test_interleaved_users_are_paired_within_their_step(warehouse: Warehouse) -> None:
    warehouse.land_events(
        events([
            ("x", "champion", "1", "impression", 5), ("x", "challenger", "2", "impression", 5),
            ("x", "challenger", "2", "click", 6),
            ("y", "champion", "1", "impression", 7),  # not in the canary: champion list only
            ("z", "challenger", "2", "impression", 8),
        ]),
        source="test", origin="t",
    )  # fmt: skip
    (stratum, _) = canary_strata(canary_events(warehouse, state("interleaving"), champion=1), state("interleaving"))
    assert stratum.paired
    assert stratum.champion.users == stratum.challenger.users == 2  # x and z; y is not interleaved
    assert list(stratum.champion.impressions) == [1.0, 0.0]
    assert list(stratum.challenger.clicks) == [1.0, 0.0]


def test_histogram_quantile_interpolates_as_prometheus_does() -> None:
    # 100 observations: 90 under 10 ms, 9 in (10, 25], 1 in (25, 50]
    buckets = [(0.01, 90.0), (0.025, 99.0), (0.05, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01 * 50 / 90)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.025)
    assert histogram_quantile(0.995, buckets) == pytest.approx(0.025 + 0.025 * 0.5)
    assert histogram_quantile(0.99, []) is None


def test_serving_health_from_the_services_own_metrics() -> None:
    import prometheus_client

    registry = prometheus_client.CollectorRegistry()
    seconds = prometheus_client.Histogram("recsys_request_duration_seconds", "", ["variant", "model_version"],
                                          buckets=(0.001, 0.01, 0.1), registry=registry)  # fmt: skip
    errors = prometheus_client.Counter("recsys_request_errors", "", ["variant", "model_version"], registry=registry)
    for _ in range(200):
        seconds.labels("champion", "1").observe(0.0005)
        seconds.labels("challenger", "2").observe(0.05)
        seconds.labels("challenger", "9").observe(0.0005)  # an earlier challenger: not counted
    errors.labels("challenger", "2").inc(4)
    text = prometheus_client.generate_latest(registry).decode()
    health = serving_health_from_metrics(text, {"champion": 1, "challenger": 2}, "ab")
    assert (health["champion"].requests, health["challenger"].requests) == (200, 200)
    assert health["challenger"].errors == 4
    assert health["champion"].latency_p99_seconds <= 0.001
    assert 0.01 < health["challenger"].latency_p99_seconds <= 0.1


def test_the_canary_plan_lives_in_the_registry_and_ends_with_the_canary(tmp_path) -> None:
    registry = ControlPlane(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", tmp_path / "cache")
    model_dir = tiny_version(tmp_path / "v")
    for name in ("one", "two"):
        run_id = registry.start_run(name, tags={})
        registry.register(model_uri=registry.log_model(run_id, model_dir), run_id=run_id, lineage={}, reason=name,
                          by="test")  # fmt: skip
    assert registry.serving_state().fraction == 0.0
    with pytest.raises(RegistryError, match="not the challenger"):
        registry.set_canary(1, step=0, fraction=0.05, mode="ab", reason="t", by="t")
    registry.set_canary(2, step=0, fraction=0.05, mode="interleaving", reason="start", by="t")
    registry.set_canary(2, step=1, fraction=0.2, mode="interleaving", reason="no harm", by="t")
    with pytest.raises(RegistryError, match="does not go back"):
        registry.set_canary(2, step=0, fraction=0.05, mode="interleaving", reason="t", by="t")
    served = registry.serving_state()
    assert (served.champion, served.challenger, served.fraction, served.mode) == (1, 2, 0.2, "interleaving")
    assert [s for s, _, _ in served.canary.step_starts()] == [0, 1]
    assert [e["action"] for e in registry.get(2).history][-2:] == [
        "canary at 5% (interleaving, step 0)", "canary at 20% (interleaving, step 1)"]  # fmt: skip
    registry.promote(reason="won", by="t")
    assert registry.serving_state().canary is None
    assert np.isclose(registry.serving_state().fraction, 0.0)
