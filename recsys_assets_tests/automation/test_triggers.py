"""The trigger logic without Dagster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from recsys_assets.triggers import NewDataProgress, RetrainState, feedback_ctr_episode, firing_episodes
from recsys_core.warehouse import Warehouse

NOW = datetime(2026, 6, 1, 12, 30, tzinfo=UTC)


def test_progress_says_how_close_it_is() -> None:
    progress = NewDataProgress(new_rows=1240, trained_rows=10000, fraction=0.2)
    assert not progress.reached
    assert progress.describe().startswith("12.4% of 20%: 1,240 new positive events against 10,000")
    assert NewDataProgress(2000, 10000, 0.2).reached


def test_backoff_doubles_after_each_gate_failure_and_resets_on_success() -> None:
    state = RetrainState()
    state.record_gate_failure(NOW, timedelta(minutes=10))
    assert state.backoff_until == (NOW + timedelta(minutes=10)).isoformat()
    state.record_gate_failure(NOW, timedelta(minutes=10))
    assert state.backoff_until == (NOW + timedelta(minutes=20)).isoformat()
    assert state.backing_off(NOW + timedelta(minutes=19))
    assert not state.backing_off(NOW + timedelta(minutes=21))
    for _ in range(20):
        state.record_gate_failure(NOW, timedelta(minutes=10))
    assert datetime.fromisoformat(state.backoff_until) - NOW == timedelta(days=2)  # capped
    state.record_success()
    assert (state.gate_failures, state.backoff_until) == (0, None)
    assert RetrainState.from_cursor(state.to_cursor()) == state


def test_only_firing_alerts_labelled_retrain_count() -> None:
    alerts = [
        {"labels": {"alertname": "RecsysCTRBelowWeeklyLevel", "retrain": "true"}, "state": "firing", "activeAt": "t1"},
        {"labels": {"alertname": "RecsysCTRBelowWeeklyLevel", "retrain": "true"}, "state": "pending", "activeAt": "t2"},
        {"labels": {"alertname": "RecsysNoTraffic"}, "state": "firing", "activeAt": "t3"},
    ]
    (episode,) = firing_episodes(alerts)
    assert episode.key == "RecsysCTRBelowWeeklyLevel@t1"


def _events(rows: list[tuple[datetime, str, int]]) -> pl.DataFrame:
    out = []
    for i, (at, kind, n) in enumerate(rows):
        for j in range(n):
            out.append(
                {
                    "event_id": f"{i}-{j}",
                    "user_id": "u",
                    "track_id": "t",
                    "played_at": at,
                    "event_type": kind,
                    "source": "recommendation",
                    "model_version": "3",
                    "variant": "champion",
                }  # fmt: skip
            )
    return pl.DataFrame(out)


@pytest.mark.parametrize(("recent_clicks", "alert"), [(30, True), (100, False)])
def test_feedback_ctr_drop_without_prometheus(tmp_path, recent_clicks: int, alert: bool) -> None:
    wh = Warehouse(f"duckdb:///{tmp_path / 'w.duckdb'}")
    wh.init_schema()
    week = NOW - timedelta(days=3)
    recent = NOW - timedelta(minutes=20)
    wh.land_events(
        _events(
            [
                (week, "impression", 5000),
                (week, "click", 500),
                (recent, "impression", 1000),
                (recent, "click", recent_clicks),
            ]
        ),
        source="test",
        origin="t",
    )
    episode, description = feedback_ctr_episode(wh, version=3, drop=0.8, now=NOW)
    assert (episode is not None) == alert, description
    if alert:
        assert episode.started_at == "2026-06-01T12:00:00+00:00"
        assert "champion CTR 3.00% in the last hour" in description
    quiet, why = feedback_ctr_episode(wh, version=4, drop=0.8, now=NOW)
    assert quiet is None
    assert "0 champion impressions in the last hour" in why
