"""Drive the simulator into a warehouse: a whole history, or a live stream of new events.

The simulated world is saved under ``$RECSYS_HOME/simulator`` so that a stream continues the same
world, and so that the evaluation and the traffic simulator can ask it for true click probabilities.
Events land through :meth:`Warehouse.land_events`, the same path as imported data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from recsys_core.warehouse import BatchReport, Warehouse
from recsys_sim.simulator import Drift, World, history_bounds

log = logging.getLogger(__name__)

BATCH_ROWS = 1_000_000


def world_dir(home: Path) -> Path:
    return home / "simulator"


class LiveWorld:
    """The simulated world as the stream last saved it, for simulated users who react to recommendations.

    The stream changes the world as it goes (a drift of tastes, new releases) and saves it; a traffic
    simulator that kept the world it loaded at its start would click with yesterday's tastes and judge
    a model trained on today's listening unfairly. This one reloads the world when its files change,
    checking at most every ``check_seconds``.
    """

    def __init__(self, directory: Path, check_seconds: float = 2.0):
        self.directory, self.check_seconds = directory, check_seconds
        self._world = World.load(directory)
        self._stamp = self._mtime()
        self._checked = time.monotonic()

    def _mtime(self) -> int:
        return (self.directory / "world.json").stat().st_mtime_ns

    @property
    def world(self) -> World:
        if time.monotonic() - self._checked >= self.check_seconds:
            self._checked = time.monotonic()
            if (stamp := self._mtime()) != self._stamp:
                self._world, self._stamp = World.load(self.directory), stamp
        return self._world

    @property
    def n_users(self) -> int:
        return self.world.n_users

    def click_probability(self, user_ids, track_ids):
        return self.world.click_probability(user_ids, track_ids)

    def affinity(self, user_ids, track_ids):
        return self.world.affinity(user_ids, track_ids)


@dataclass(frozen=True)
class SimulationReport:
    events: int
    batches: list[BatchReport]
    seconds: float
    generate_seconds: float
    users: int
    tracks: int

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def expected_events_per_day(world: World) -> float:
    """The expected number of events a day across all users (plays, skips, likes, dislikes)."""
    b = world.behaviour
    return float(world.a["activity"].sum()) * b.mean_session_length * 1.15


def simulate_history(
    warehouse: Warehouse,
    home: Path,
    *,
    users: int,
    tracks: int,
    days: int,
    seed: int,
    end: datetime | None = None,
    drift: Drift | None = None,
    drift_at: float = 0.7,
    batch_rows: int = BATCH_ROWS,
    progress: Callable[[int, float], None] | None = None,
) -> SimulationReport:
    """Create a world and land ``days`` of its listening history, ending at ``end``.

    Args:
        warehouse: where the catalogue and events land.
        home: ``RECSYS_HOME`` (the world is saved in its ``simulator`` directory).
        users: number of users.
        tracks: number of tracks.
        days: length of the history.
        seed: the seed.
        end: end of the history (default: today 00:00 UTC).
        drift: a drift to apply at ``drift_at`` of the history.
        drift_at: fraction of the history after which ``drift`` applies.
        batch_rows: events per landed batch.
        progress: called with (events landed so far, expected total) after each batch.
    """
    if days < 1:
        raise ValueError(f"--days {days}: the history needs at least one day")
    start, end = history_bounds(days, end)
    world = World.create(users=users, tracks=tracks, seed=seed, start=start, end=end)
    warehouse.init_schema()
    origin = f"simulator seed={seed} users={users} tracks={tracks} days={days}"
    segments = [(start, end)]
    if drift is not None and drift.active:
        cut = start + timedelta(seconds=(end - start).total_seconds() * drift_at)
        segments = [(start, cut), (cut, end)]
    expected = expected_events_per_day(world) * days
    t0 = time.perf_counter()
    gen_seconds = 0.0
    batches: list[BatchReport] = []
    pending: list[pl.DataFrame] = []
    pending_rows = 0
    total = 0

    def flush() -> None:
        nonlocal pending, pending_rows, total
        if not pending:
            return
        frame = pl.concat(pending)
        batches.append(warehouse.land_events(frame, source="simulator", origin=origin))
        total += frame.height
        pending, pending_rows = [], 0
        if progress is not None:
            progress(total, expected)

    for index, (seg_start, seg_end) in enumerate(segments):
        if index == 1:
            world.apply_drift(drift, seg_start)
        # The catalogue as of the segment's end (a drift adds tracks).
        warehouse.upsert_catalog(tracks=world.tracks_frame(), users=world.users_frame())
        g0 = time.perf_counter()
        for frame in world.generate(seg_start, seg_end):
            gen_seconds += time.perf_counter() - g0
            pending.append(frame)
            pending_rows += frame.height
            if pending_rows >= batch_rows:
                flush()
            g0 = time.perf_counter()
    flush()
    world.save(world_dir(home))
    return SimulationReport(
        events=total,
        batches=batches,
        seconds=time.perf_counter() - t0,
        generate_seconds=gen_seconds,
        users=world.n_users,
        tracks=world.n_tracks,
    )


def stream_tick(
    warehouse: Warehouse, world: World, *, start: datetime, end: datetime, events: int
) -> BatchReport | None:
    """Land about ``events`` new events stamped between ``start`` and ``end``.

    The stream is time-compressed: the simulated clock advances by as much simulated time as it takes
    every user together to produce ``events`` events, and that stretch of behaviour (sessions, the
    weekly pools of tracks users come across) is mapped onto the real window.
    """
    per_day = expected_events_per_day(world)
    span = timedelta(days=max(events / per_day, 1 / 1440)) if per_day else timedelta(minutes=1)
    sim_start = datetime.fromisoformat(world.state.last_event_at) if world.state.last_event_at else start - span
    sim_end = sim_start + span
    world.state.stream_batches += 1
    prefix = f"sim{world.seed}-s{world.state.stream_batches}-"
    frames = list(world.generate(sim_start, sim_end, id_prefix=prefix))
    world.state.last_event_at = sim_end.isoformat()
    if not frames:
        return None
    frame = pl.concat(frames)
    span = (end - start).total_seconds()
    sim_span = (sim_end - sim_start).total_seconds()
    offset = (pl.col("played_at") - pl.lit(sim_start)).dt.total_microseconds() / (sim_span * 1e6)
    frame = frame.with_columns(
        (pl.lit(start) + pl.duration(microseconds=(offset * span * 1e6).cast(pl.Int64))).alias("played_at")
    )
    return warehouse.land_events(frame, source="simulator", origin=f"simulator stream seed={world.seed}")


def stream(
    warehouse: Warehouse,
    home: Path,
    *,
    rate: float,
    interval: float,
    duration: float | None = None,
    drift: Drift | None = None,
    on_batch: Callable[[BatchReport], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """Keep landing new events at ``rate`` events/s, one batch every ``interval`` seconds.

    Returns:
        The number of events landed.
    """
    directory = world_dir(home)
    world = World.load(directory)
    if drift is not None and drift.active:
        world.apply_drift(drift, datetime.now(UTC))
        warehouse.upsert_catalog(tracks=world.tracks_frame(), users=world.users_frame())
        world.save(directory)
    landed = 0
    began = time.monotonic()
    window_start = datetime.now(UTC)
    while not should_stop():
        time.sleep(interval)
        window_end = datetime.now(UTC)
        report = stream_tick(warehouse, world, start=window_start, end=window_end, events=int(rate * interval))
        world.save(directory)
        window_start = window_end
        if report is not None:
            landed += report.landed
            if on_batch is not None:
                on_batch(report)
        if duration is not None and time.monotonic() - began >= duration:
            break
    return landed
