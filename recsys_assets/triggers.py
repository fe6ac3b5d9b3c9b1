"""The logic of the retrain triggers, without Dagster: :func:`decide_retrain` orders the reasons to
retrain; the one retrain sensor (``defs/automation/sensors.py``) gathers the facts it takes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

from recsys_assets.ml.prometheus import AlertEpisode
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
    handled_alerts: list[str] = field(default_factory=list)  # alert episodes already answered by a retrain
    feedback_episode: str | None = None  # without Prometheus: the hour the feedback-table alert began
    drift_report: int = 0  # the last drift report (storage id) looked at
    monthly_tick: str | None = None  # the last monthly tick answered by a retrain

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


# The reasons to retrain, most urgent first, with the ``dagster/priority`` of their runs (higher runs first
# in the run queue): production hurts now; then the data moved; then there is enough new data; then the
# calendar; a platform with no model yet trains its first one last, as soon as nothing else is due.
PRIORITIES = {"kpi-alert": 4, "drift": 3, "new-data": 2, "monthly": 1, "bootstrap": 0}


@dataclass(frozen=True)
class RetrainFacts:
    """What the retrain sensor saw on one tick: everything :func:`decide_retrain` needs, read beforehand.

    Args:
        running: the id of the retrain run queued or running, if any.
        champion: the champion's version (``None``: no model yet).
        challenger: the challenger in canary, if any.
        backoff: why retraining waits after rejected candidates or failed runs, if it does.
        alert: the first firing alert episode not answered yet, and where it was read.
        drift_report: the latest drift report's id when it found drift and is not answered yet.
        drift_share: that report's share of drifted columns.
        new_data: new positive events in prepared partitions against the champion's training rows
            (``None`` when the champion's lineage has no training cutoff).
        monthly_tick: the latest monthly tick after the champion was trained, if not answered yet.
        prepared_rows: positive events in the prepared partitions (what a first model would train on).
    """

    running: str | None = None
    champion: int | None = None
    challenger: int | None = None
    backoff: str | None = None
    alert: AlertEpisode | None = None
    alert_source: str = ""
    drift_report: int | None = None
    drift_share: float = 0.0
    new_data: NewDataProgress | None = None
    monthly_tick: str | None = None
    prepared_rows: int = 0


@dataclass(frozen=True)
class RetrainDecision:
    """Retrain now for ``trigger`` (under ``run_key``), or not (``trigger`` is ``None``); ``reason`` says why."""

    trigger: str | None
    reason: str
    run_key: str | None = None

    @property
    def priority(self) -> int:
        return PRIORITIES[self.trigger] if self.trigger else 0


def decide_retrain(facts: RetrainFacts, attempt: int) -> RetrainDecision:
    """Whether to start a retrain now, and for which reason (the most urgent of those that hold).

    A retrain never starts while one runs, nor while a challenger's canary is undecided (its online
    decision comes first). Alerts and drift are answered even while backing off: they say the served
    model is wrong now. New data, the calendar and the first model wait for the backoff.

    Args:
        facts: what the sensor saw.
        attempt: the number of this request among the sensor's, for run keys that must not repeat.
    """
    if facts.running:
        return RetrainDecision(None, f"a retrain is running (run {facts.running[:8]})")
    if facts.challenger is not None:
        return RetrainDecision(None, f"challenger v{facts.challenger} is in canary: waiting for its decision")
    if facts.alert is not None:
        reason = f"{facts.alert.name} firing since {facts.alert.started_at} ({facts.alert_source})"
        return RetrainDecision("kpi-alert", reason, f"alert:{facts.alert.key}")
    if facts.drift_report is not None:
        reason = f"drift share {facts.drift_share:.0%} in report {facts.drift_report}"
        return RetrainDecision("drift", reason, f"drift:{facts.drift_report}")
    if facts.backoff:
        return RetrainDecision(None, facts.backoff)
    if facts.champion is None:
        if facts.prepared_rows == 0:
            return RetrainDecision(None, "no champion and no prepared listening data yet")
        reason = f"no champion yet; {facts.prepared_rows:,} positive events prepared"
        return RetrainDecision("bootstrap", reason, f"bootstrap-{attempt}")
    if facts.new_data is not None and facts.new_data.reached:
        key = f"new-data:champion-v{facts.champion}:attempt-{attempt}"
        return RetrainDecision("new-data", facts.new_data.describe(), key)
    if facts.monthly_tick is not None:
        return RetrainDecision(
            "monthly", f"monthly retrain due (tick {facts.monthly_tick})", f"monthly:{facts.monthly_tick}"
        )
    if facts.new_data is None:  # a version registered by hand, without the training data's lineage
        return RetrainDecision(None, f"champion v{facts.champion} has no training cutoff: new data cannot be counted")
    return RetrainDecision(None, facts.new_data.describe())


def latest_cron_tick(cron: str, now: datetime) -> datetime:
    """The latest tick of ``cron`` (UTC) at or before ``now``. croniter, not a hand-written parser."""
    from croniter import croniter

    # croniter's previous tick is strictly before its start: start a second later to count ``now`` itself.
    return croniter(cron, now + timedelta(seconds=1)).get_prev(datetime).replace(fold=0)
