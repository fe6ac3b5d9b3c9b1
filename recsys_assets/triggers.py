"""The logic of the retrain triggers, without Dagster (the sensors in ``sensors.py`` wrap it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

from recsys_core.warehouse import Warehouse

MAX_BACKOFF = timedelta(days=2)


@dataclass(frozen=True)
class NewDataProgress:
    new_rows: int
    trained_rows: int
    fraction: float

    @property
    def ratio(self) -> float:
        return self.new_rows / self.trained_rows if self.trained_rows else float("inf")

    @property
    def reached(self) -> bool:
        return self.ratio >= self.fraction

    def describe(self) -> str:
        return (
            f"{self.ratio:.1%} of {self.fraction:.0%}: {self.new_rows:,} new positive events "
            f"against {self.trained_rows:,} the champion was trained on"
        )


def new_positive_events(warehouse: Warehouse, since: datetime) -> int:
    """Listening events that would become training positives (plays and likes) after ``since``."""
    warehouse.init_schema()
    return int(
        warehouse.scalar(
            "SELECT COUNT(*) FROM listening_events WHERE played_at > ? AND event_type IN ('play', 'like')", [since]
        )
    )


@dataclass
class RetrainState:
    """What the new-data sensor remembers between ticks (its cursor)."""

    pending_run_key: str | None = None
    requested_at: str | None = None
    gate_failures: int = 0
    backoff_until: str | None = None
    attempts: int = 0
    history: list[str] = field(default_factory=list)
    crashes: int = 0  # retrain runs that failed (not the gate: a crash, a kill, a broken store) in a row

    def to_cursor(self) -> str:
        import json

        return json.dumps(asdict(self))

    @classmethod
    def from_cursor(cls, cursor: str | None) -> RetrainState:
        import json

        return cls(**json.loads(cursor)) if cursor else cls()

    def backing_off(self, now: datetime) -> bool:
        return self.backoff_until is not None and now < datetime.fromisoformat(self.backoff_until)

    def record_gate_failure(self, now: datetime, base: timedelta) -> None:
        """One more rejected candidate: wait base, 2·base, 4·base… (at most two days) before retrying."""
        self.gate_failures += 1
        wait = min(base * 2 ** (self.gate_failures - 1), MAX_BACKOFF)
        self.backoff_until = (now + wait).isoformat()

    def record_crash(self, now: datetime, base: timedelta) -> None:
        """One more failed retrain run: wait base, 2·base, 4·base… (at most two days), so that a
        broken store or a run killed for memory is not retried in a tight loop."""
        self.crashes += 1
        wait = min(base * 2 ** (self.crashes - 1), MAX_BACKOFF)
        self.backoff_until = max(self.backoff_until or "", (now + wait).isoformat())

    def describe_backoff(self) -> str:
        why = [f"{n} {what}" for n, what in ((self.gate_failures, "rejected candidate(s)"),
                                             (self.crashes, "failed retrain run(s)")) if n]  # fmt: skip
        return f"backing off after {' and '.join(why)} until {self.backoff_until}"

    def record_success(self) -> None:
        self.gate_failures = 0
        self.crashes = 0
        self.backoff_until = None


@dataclass(frozen=True)
class AlertEpisode:
    """One firing period of one alert: a retrain is requested once per episode."""

    name: str
    started_at: str

    @property
    def key(self) -> str:
        return f"{self.name}@{self.started_at}"


def firing_episodes(alerts: list[dict]) -> list[AlertEpisode]:
    """The firing alerts labelled ``retrain="true"`` of Prometheus's ``/api/v1/alerts`` answer."""
    return [
        AlertEpisode(alert["labels"]["alertname"], alert.get("activeAt", ""))
        for alert in alerts
        if alert.get("state") == "firing" and alert.get("labels", {}).get("retrain") == "true"
    ]


def feedback_ctr_episode(warehouse: Warehouse, version: int, drop: float, now: datetime | None = None,
                         min_impressions: int = 500) -> tuple[AlertEpisode | None, str]:  # fmt: skip
    """Without Prometheus: the champion's CTR over the last hour below ``drop`` × its 7-day level.

    Returns the episode (keyed by the hour it was first seen) or ``None``, and a description.
    """
    now = now or datetime.now(UTC)
    rows = warehouse.fetch(
        "SELECT played_at >= ? AS recent, event_type, COUNT(*) AS n FROM listening_events "
        "WHERE source = 'recommendation' AND variant = 'champion' AND model_version = ? AND played_at >= ? "
        "AND event_type IN ('impression', 'click') GROUP BY 1, 2",
        [now - timedelta(hours=1), str(version), now - timedelta(days=7)],
    )
    counts = {(bool(r), t): n for r, t, n in rows.iter_rows()}
    recent_imp, recent_clicks = counts.get((True, "impression"), 0), counts.get((True, "click"), 0)
    week_imp = recent_imp + counts.get((False, "impression"), 0)
    week_clicks = recent_clicks + counts.get((False, "click"), 0)
    if recent_imp < min_impressions or week_imp == 0:
        return None, f"{recent_imp:,} champion impressions in the last hour ({min_impressions:,} needed to judge CTR)"
    recent_ctr, week_ctr = recent_clicks / recent_imp, week_clicks / week_imp
    description = f"champion CTR {recent_ctr:.2%} in the last hour against {week_ctr:.2%} over 7 days"
    if recent_ctr < drop * week_ctr:
        hour = now.replace(minute=0, second=0, microsecond=0).isoformat()
        return AlertEpisode("FeedbackCTRDrop", hour), description
    return None, description
