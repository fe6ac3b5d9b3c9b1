"""The closed loop, unattended: the simulated world around the platform, and a narrator.

``recsys demo`` starts the local stack (the Dagster daemon runs every trigger), fills an empty
warehouse with a simulated history, and then plays the world:

- a stream of new listening events (``StreamDriver``), which crosses the new-data threshold again and
  again;
- simulated users calling the endpoint and reacting to what they get (``TrafficDriver``), which feeds
  the canary analysis;
- after the first canary decision, a drift of the users' tastes (the stream restarts with
  ``taste_shift``), which the drift report catches.

The narrator prints what the platform does by itself: retrain runs and their triggers, versions
registered, canaries promoted or rolled back. Everything is also in the Dagster and MLflow UIs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

from recsys_core.registry import CHALLENGER, CHAMPION, Registry, RegistryError
from recsys_core.warehouse import BatchReport, Warehouse, WarehouseError
from recsys_sim.simulation import LiveWorld, stream, world_dir
from recsys_sim.simulator import Drift, World
from recsys_sim.traffic import Behaviour, TrafficReport, run_traffic

log = logging.getLogger(__name__)

# The loop's cadences for a demo on one machine (each can be overridden from the environment).
DEMO_ENVIRONMENT = {
    "RECSYS_SENSOR_INTERVAL_SECONDS": "10",
    "RECSYS_EXTRACT_MIN_INTERVAL_SECONDS": "60",
    # The stream compresses a simulated day into seconds: compare the last 15 minutes, not 7 days.
    "RECSYS_DRIFT_WINDOW_DAYS": "0.0104",
    "RECSYS_DRIFT_CRON": "*/2 * * * *",
    # The challenger's traffic steps up 10% → 30% (a look, and a step, per 1,500 challenger impressions).
    "RECSYS_CANARY_STEPS": "0.1,0.3",
    "RECSYS_CANARY_MIN_IMPRESSIONS": "1500",
    "RECSYS_CANARY_MAX_IMPRESSIONS": "6000",
    "RECSYS_RETRAIN_BACKOFF_SECONDS": "120",
    "RECSYS_MODEL_POLL_SECONDS": "3",
}


class StreamDriver:
    """New simulated events landing in the warehouse, in a background thread."""

    def __init__(self, warehouse: Warehouse, home: Path, rate: float, interval: float = 2.0):
        self.warehouse, self.home, self.rate, self.interval = warehouse, home, rate, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.landed = 0
        self.failures = 0  # batches the warehouse refused (each retried)

    def start(self, drift: Drift | None = None) -> None:
        self.stop()
        self._stop = threading.Event()

        def count(report: BatchReport) -> None:
            self.landed += report.landed

        def run() -> None:
            while not self._stop.is_set():
                try:
                    stream(
                        self.warehouse, self.home, rate=self.rate, interval=self.interval, drift=drift,
                        on_batch=count, should_stop=self._stop.is_set,
                    )  # fmt: skip
                    return
                except WarehouseError as exc:  # an outage: the world goes on streaming once it answers
                    self.failures += 1
                    log.warning("the stream could not land a batch (retrying): %s", exc)
                    self._stop.wait(self.interval)

        self._thread = threading.Thread(target=run, name="stream", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None


class TrafficDriver:
    """Simulated users calling ``/recommend`` and sending feedback, in a background thread."""

    def __init__(self, url: str, home: Path, rps: float, users: int = 2000, chunk_seconds: float = 20.0):
        self.url, self.home, self.rps, self.users, self.chunk = url, home, rps, users, chunk_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reports: list[TrafficReport] = []

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        world = LiveWorld(world_dir(self.home))
        rng = np.random.default_rng(0)
        user_ids = list(World.user_id(rng.choice(world.n_users, min(self.users, world.n_users), replace=False)))
        behaviour = Behaviour(world.click_probability, world.affinity, seed=1)
        while not self._stop.is_set():
            if not self._serving():
                self._stop.wait(5)
                continue
            report = asyncio.run(run_traffic(self.url, user_ids, behaviour, rps=self.rps, duration=self.chunk))
            self.reports.append(report)

    def _serving(self) -> bool:
        try:
            return httpx.post(f"{self.url}/recommend", json={"user_id": "probe", "k": 1}, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)


class Narrator:
    """Prints what changes in the registry and in the retrain runs."""

    def __init__(self, registry: Registry, echo: Callable[[str], None]):
        self.registry = registry
        self.echo = echo
        self.seen_events: set[str] = set()
        self.seen_runs: dict[str, str] = {}
        self.decisions = 0

    def say(self, message: str) -> None:
        self.echo(f"[{datetime.now(UTC):%H:%M:%S}] {message}")

    def poll_registry(self) -> None:
        try:
            versions = self.registry.versions()
        except RegistryError as exc:
            self.say(f"registry unavailable: {exc}")
            return
        for version in versions:
            for event in version.history:
                key = f"{event['at']}|{event['action']}|{event['to']}|{event['from']}"
                if key in self.seen_events:
                    continue
                self.seen_events.add(key)
                if event["action"] in ("promoted to champion", "challenger rolled back"):
                    self.decisions += 1
                target = event["to"] if event["to"] is not None else event["from"]
                self.say(f"model v{target}: {event['action']} — {event['reason'][:160]}")

    def poll_runs(self) -> None:
        import dagster as dg

        with dg.DagsterInstance.get() as instance:
            runs = instance.get_runs(filters=dg.RunsFilter(tags={"recsys/retrain": "true"}), limit=20)
        for run in runs:
            status = run.status.value
            if self.seen_runs.get(run.run_id) == status:
                continue
            self.seen_runs[run.run_id] = status
            trigger = run.tags.get("recsys/trigger", "manual")
            self.say(f"retrain run {run.run_id[:8]} ({trigger}: {run.tags.get('recsys/reason', '')[:90]}) {status}")
            if run.status == dg.DagsterRunStatus.FAILURE:
                found = instance_records = None
                with dg.DagsterInstance.get() as instance:
                    instance_records = instance.fetch_materializations(
                        dg.AssetKey("model_evaluation"), limit=1, ascending=False
                    ).records
                found = instance_records[0] if instance_records and instance_records[0].run_id == run.run_id else None
                if found is not None:
                    decision = found.event_log_entry.asset_materialization.metadata.get("decision")
                    self.say(f"  the gate rejected the candidate: {decision.value if decision else '?'}")


def champion_and_challenger(registry: Registry) -> tuple[int | None, int | None]:
    champion, challenger = registry.by_alias(CHAMPION), registry.by_alias(CHALLENGER)
    return (champion.version if champion else None, challenger.version if challenger else None)


def play_world(
    *,
    warehouse: Warehouse,
    registry: Registry,
    home: Path,
    serving_url: str,
    stream_rate: float,
    traffic_rps: float,
    echo: Callable[[str], None],
    should_stop: Callable[[], bool],
    drift: Drift | None = None,
    drift_after_seconds: float = 600.0,
) -> None:
    """Run the world and narrate until ``should_stop``; inject ``drift`` after the first canary
    decision, or after ``drift_after_seconds`` if no canary was decided by then."""
    narrator = Narrator(registry, echo)
    streamer = StreamDriver(warehouse, home, stream_rate)
    traffic = TrafficDriver(serving_url, home, traffic_rps)
    streamer.start()
    traffic.start()
    narrator.say(f"streaming {stream_rate:g} events/s and {traffic_rps:g} requests/s of simulated users")
    # One line a minute sums the stream and the traffic up; a line per landed batch would bury the story.
    batch_log = logging.getLogger("recsys_core.warehouse")
    batch_log_level = batch_log.level
    if not batch_log.isEnabledFor(logging.DEBUG):
        batch_log.setLevel(logging.WARNING)
    drifted = False
    started = last_summary = time.monotonic()
    try:
        while not should_stop():
            narrator.poll_runs()
            narrator.poll_registry()
            if time.monotonic() - last_summary >= 60:
                narrator.say(traffic_summary(streamer.landed, traffic.reports))
                last_summary = time.monotonic()
            due = narrator.decisions >= 1 or time.monotonic() - started > drift_after_seconds
            if drift is not None and not drifted and due:
                narrator.say(f"injecting drift into the stream: {drift}")
                streamer.start(drift)
                drifted = True
            time.sleep(5)
    finally:
        traffic.stop()
        streamer.stop()
        batch_log.setLevel(batch_log_level)


def traffic_summary(landed: int, reports: list[TrafficReport]) -> str:
    """``12,345 events streamed; 900 requests (0 failed); CTR challenger 28.0%, champion 31.2%``."""
    requests, failures = sum(r.requests for r in reports), sum(r.failures for r in reports)
    total = TrafficReport()
    for report in reports:
        for variant, counts in report.by_variant.items():
            for key, n in counts.items():
                total.count(variant, key, n)
    ctrs = ", ".join(f"{variant} {total.ctr(variant):.1%}" for variant in sorted(total.by_variant))
    return f"{landed:,} events streamed; {requests:,} requests ({failures:,} failed); CTR {ctrs or 'not yet measured'}"
