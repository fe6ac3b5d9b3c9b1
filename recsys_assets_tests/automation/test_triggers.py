"""The trigger logic without Dagster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from recsys_assets.ml.prometheus import AlertEpisode, firing_episodes
from recsys_assets.triggers import (
    NewDataProgress,
    RetrainFacts,
    RetrainState,
    decide_retrain,
    feedback_ctr_episode,
    latest_cron_tick,
)
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


ALERT = AlertEpisode("RecsysCTRBelowWeeklyLevel", "t1")
DUE = NewDataProgress(3000, 10000, 0.2)
NOT_DUE = NewDataProgress(100, 10000, 0.2)


@pytest.mark.parametrize(
    ("facts", "trigger", "run_key", "why"),
    [
        # Every reason at once: the alert goes first, then drift, new data, the calendar.
        (RetrainFacts(champion=3, alert=ALERT, drift_report=7, drift_share=0.6, new_data=DUE, monthly_tick="m"),
         "kpi-alert", f"alert:{ALERT.key}", "RecsysCTRBelowWeeklyLevel firing"),
        (RetrainFacts(champion=3, drift_report=7, drift_share=0.6, new_data=DUE, monthly_tick="m"),
         "drift", "drift:7", "drift share 60% in report 7"),
        (RetrainFacts(champion=3, new_data=DUE, monthly_tick="m"),
         "new-data", "new-data:champion-v3:attempt-5", "30.0%"),
        (RetrainFacts(champion=3, new_data=NOT_DUE, monthly_tick="m"), "monthly", "monthly:m", "monthly retrain due"),
        (RetrainFacts(prepared_rows=120), "bootstrap", "bootstrap-5", "no champion yet; 120 positive events"),
        # Nothing due, or something holds every reason back.
        (RetrainFacts(champion=3, new_data=NOT_DUE), None, None, "1.0% of 20%"),
        (RetrainFacts(), None, None, "no champion and no prepared listening data yet"),
        (RetrainFacts(champion=3), None, None, "champion v3 has no training cutoff: new data cannot be counted"),
        (RetrainFacts(champion=3, monthly_tick="m"), "monthly", "monthly:m", "monthly retrain due"),
        (RetrainFacts(running="abcdef123", champion=3, alert=ALERT), None, None, "a retrain is running (run abcdef12)"),
        (RetrainFacts(champion=3, challenger=4, alert=ALERT), None, None, "challenger v4 is in canary"),
        # A backoff holds new data, the calendar and the first model; not an alert or drift.
        (RetrainFacts(champion=3, backoff="backing off", new_data=DUE, monthly_tick="m"), None, None, "backing off"),
        (RetrainFacts(backoff="backing off", prepared_rows=9), None, None, "backing off"),
        (RetrainFacts(champion=3, backoff="backing off", drift_report=7), "drift", "drift:7", "drift share"),
        (RetrainFacts(champion=3, backoff="backing off", alert=ALERT), "kpi-alert", f"alert:{ALERT.key}", "firing"),
    ],
)  # fmt: skip
def test_decide_retrain_orders_the_reasons(facts: RetrainFacts, trigger, run_key, why: str) -> None:
    decision = decide_retrain(facts, attempt=5)
    assert (decision.trigger, decision.run_key) == (trigger, run_key)
    assert why in decision.reason


def test_more_urgent_retrains_run_first_in_the_queue() -> None:
    priorities = [decide_retrain(f, 1).priority for f in (
        RetrainFacts(champion=3, alert=ALERT), RetrainFacts(champion=3, drift_report=1),
        RetrainFacts(champion=3, new_data=DUE), RetrainFacts(champion=3, monthly_tick="m"),
        RetrainFacts(prepared_rows=1),
    )]  # fmt: skip
    assert priorities == sorted(priorities, reverse=True)
    assert len(set(priorities)) == 5


@pytest.mark.parametrize(
    ("now", "tick"),
    [
        (datetime(2026, 6, 1, 2, 59, tzinfo=UTC), datetime(2026, 5, 1, 3, tzinfo=UTC)),
        (datetime(2026, 6, 1, 3, 0, tzinfo=UTC), datetime(2026, 6, 1, 3, tzinfo=UTC)),
        (datetime(2026, 6, 17, tzinfo=UTC), datetime(2026, 6, 1, 3, tzinfo=UTC)),
    ],
)
def test_the_monthly_tick_is_the_latest_at_or_before_now(now: datetime, tick: datetime) -> None:
    assert latest_cron_tick("0 3 1 * *", now) == tick
