"""The users' state at request time: each user's positive tracks since the served version's cutoff.

A history-aware version ranks a user from their last N tracks (``recsys_core.scoring``); its export
holds them as of the training cutoff. :class:`RecentPlays` holds what came after, per worker, from two
sources:

- the likes and plays this worker receives on ``/feedback``: the next answer to that user uses them;
- those the service's other workers on the machine receive (:class:`SiblingFeedback`, which follows
  their write-ahead logs in the shared spill directory every :data:`FOLLOW_SECONDS`): the user's next
  request is answered by any worker, and each follows what the others acknowledged;
- the organic events that land in the warehouse (:class:`WarehousePoll`): every batch landed since the
  champion's cutoff, in batch order, as the extraction reads them. Feedback received by another replica
  lands there too, so replicas converge within one poll interval. A champion whose cutoff is older
  than where the poll started (the first one, loaded after the service started; a rollback) gets the
  batches in between read once, behind the newer plays.

Memory is bounded: at most ``per_user`` tracks a user (distinct, most recent first) and ``max_users``
users, the least recently updated evicted first (counted). Track ids are interned, so a track heard by
many users is stored once; ``benchmarks/user_state.py`` measures the bytes per user.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

import polars as pl

from recsys_core.contracts import POSITIVE_EVENT_TYPES
from recsys_core.warehouse import Warehouse
from serving.feedback import logged_plays
from serving.periodic import PeriodicLoop

log = logging.getLogger(__name__)

DEFAULT_PER_USER = 50  # the longest history a version's tower takes, with room: N is 20 by default
FOLLOW_SECONDS = 0.25  # how often a worker reads what its siblings logged


class RecentPlays:
    """User → their distinct positive tracks since the cutoff, most recent first (a bounded LRU).

    A track already held keeps its place when played again: histories order tracks by their first
    play, as the training builds them (``recsys_assets.ml.history``).
    """

    def __init__(self, max_users: int, per_user: int = DEFAULT_PER_USER, on_evict: Callable[[int], None] | None = None):
        self.max_users = max_users
        self.per_user = per_user
        self.on_evict = on_evict
        self.evictions = 0
        self._users: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._lock = threading.Lock()  # writers only: a reader gets one immutable tuple

    def __len__(self) -> int:
        return len(self._users)

    def get(self, user_id: str) -> tuple[str, ...]:
        return self._users.get(user_id, ())

    def add(self, user_id: str, track_ids: Iterable[str], older: bool = False) -> None:
        """Plays of one user, oldest first; ``older``: plays from before every play held (a backfill),
        which go behind them."""
        with self._lock:
            held = list(self._users.get(user_id, ()))
            tracks = [] if older else held
            for track in track_ids:
                if track not in tracks and track not in held:
                    tracks.insert(0, sys.intern(track))
            if older:
                tracks = held + tracks
            self._users[user_id] = tuple(tracks[: self.per_user])
            self._users.move_to_end(user_id)
            evicted = 0
            while len(self._users) > self.max_users:
                self._users.popitem(last=False)
                evicted += 1
        if evicted:
            self.evictions += evicted
            if self.on_evict is not None:
                self.on_evict(evicted)

    def add_events(self, events: pl.DataFrame, older: bool = False) -> int:
        """Positive events (``user_id``, ``track_id``, ``event_type``, ``played_at``); returns how many."""
        positives = events.filter(pl.col("event_type").is_in(POSITIVE_EVENT_TYPES)).sort("played_at")
        by_user = positives.group_by("user_id", maintain_order=True).agg("track_id")
        for user_id, tracks in by_user.iter_rows():
            self.add(user_id, tracks, older=older)
        return positives.height


class WarehousePoll:
    """Follows the warehouse's landed batches into a :class:`RecentPlays`, in a background thread.

    Args:
        warehouse: where events land.
        plays: the state to update.
        cutoff: the events to start from: those played after it (the served version's training cutoff;
            ``None``: only batches landed from now on).
        on_poll: called with the number of positive events after every poll that succeeded.
        on_failure: called after every poll that failed (it is retried at the next interval).
    """

    def __init__(
        self,
        warehouse: Warehouse,
        plays: RecentPlays,
        cutoff: Callable[[], datetime | None],
        on_poll: Callable[[int], None] | None = None,
        on_failure: Callable[[], None] | None = None,
    ):
        self.warehouse = warehouse
        self.plays = plays
        self.cutoff = cutoff
        self.on_poll = on_poll
        self.on_failure = on_failure
        self.watermark: int | None = None  # the last batch read
        self._floor = 0  # the batch before the first one read
        self._anchored_at: datetime | None = None  # the cutoff the floor was computed for
        self.last_error: str | None = None
        self._loop = PeriodicLoop("user-state poll of the warehouse", self._poll_and_report,
                                  on_error=self._poll_failed, immediately=True)  # fmt: skip

    def _start_after(self, cutoff: datetime | None) -> int:
        """The batch before the first one holding an event played after ``cutoff``."""
        if cutoff is None:
            return int(self.warehouse.scalar("SELECT COALESCE(MAX(batch_id), 0) FROM ingest_batches"))
        first = self.warehouse.scalar("SELECT MIN(batch_id) FROM listening_events WHERE played_at > ?", [cutoff])
        if first is None:
            return int(self.warehouse.scalar("SELECT COALESCE(MAX(batch_id), 0) FROM ingest_batches"))
        return int(first) - 1

    def poll(self) -> int:
        """Read every batch landed since the last poll; returns the positive events added.

        When the served version's cutoff moves to before where the poll started (the first champion
        arrives after the service started, a rollback to an older version), the batches in between are
        read once and held behind the newer plays, so the version sees every play since its cutoff.
        """
        cutoff = self.cutoff()
        added = 0
        if self.watermark is None:
            self.watermark = self._floor = self._start_after(cutoff)
            self._anchored_at = cutoff
        elif cutoff != self._anchored_at:
            start = self._start_after(cutoff) if cutoff is not None else self._floor
            if start < self._floor:
                added += self.plays.add_events(self._read(start + 1, self._floor), older=True)
                self._floor = start
            self._anchored_at = cutoff  # only once read: a failed backfill is retried at the next poll
        for batch_id in self.warehouse.batches_after(self.watermark)["batch_id"].to_list():
            added += self.plays.add_events(self._read(batch_id, batch_id))
            self.watermark = batch_id
        return added

    def _read(self, first_batch: int, last_batch: int) -> pl.DataFrame:
        """The positive events of batches ``first_batch..last_batch`` (inclusive)."""
        return self.warehouse.fetch(
            "SELECT user_id, track_id, event_type, played_at FROM listening_events WHERE batch_id BETWEEN ? AND ? "
            f"AND event_type IN ({', '.join('?' * len(POSITIVE_EVENT_TYPES))})",
            [first_batch, last_batch, *POSITIVE_EVENT_TYPES],
        )

    def _poll_and_report(self) -> None:
        added = self.poll()
        self.last_error = None
        if self.on_poll is not None:
            self.on_poll(added)

    def _poll_failed(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.on_failure is not None:
            self.on_failure()

    @property
    def alive(self) -> bool:
        """Whether the poll loop runs (the service is not ready without it)."""
        return self._loop.alive

    def start(self, poll_seconds: float) -> None:
        self._loop.start(poll_seconds)

    def close(self) -> None:
        self._loop.close()


class SiblingFeedback:
    """Follows the write-ahead logs of the service's other workers into a :class:`RecentPlays`.

    The workers of one service share the spill directory, where each logs the feedback it acknowledges
    (``serving/feedback.py``: ``feedback-wal-<pid>-<ns>.jsonl``) before landing it. Every
    ``seconds``, each sibling's segment is read from where the last read stopped, complete lines only
    (a torn last line was never acknowledged); impressions are skipped, positive events added. So a like
    changes the user's next answer on every worker of the machine within a fraction of a second, not a
    warehouse poll later. Best effort by design: a segment landed and deleted between two reads reaches
    the state through the warehouse poll instead (adding a held track again changes nothing).
    """

    def __init__(self, spill_dir: Path, plays: RecentPlays, on_failure: Callable[[], None] | None = None):
        self.spill_dir = Path(spill_dir)
        self.plays = plays
        self.on_failure = on_failure
        self._own = f"feedback-wal-{os.getpid()}-"  # this worker's own feedback is added as it comes
        self._offsets: dict[Path, int] = {}
        self._loop = PeriodicLoop("following the other workers' feedback", self.poll, on_error=self._failed)

    def _failed(self, _exc: Exception) -> None:
        if self.on_failure is not None:
            self.on_failure()

    def poll(self) -> int:
        """Read what the siblings logged since the last read; returns the positive events added."""
        added = 0
        offsets = {}
        for path in sorted(self.spill_dir.glob("feedback-wal-*.jsonl")):
            if path.name.startswith(self._own):
                continue
            offset = self._offsets.get(path, 0)
            try:
                with path.open("rb") as segment:
                    segment.seek(offset)
                    chunk = segment.read()
            except FileNotFoundError:  # landed and deleted meanwhile
                continue
            complete = chunk.rfind(b"\n") + 1
            offsets[path] = offset + complete
            events, invalid = logged_plays(chunk[:complete])
            if invalid:  # not acknowledged events: the lander sets such a segment aside when it lands it
                log.warning("%d lines of %s are not events: skipped", invalid, path.name)
            by_user: dict[str, list[str]] = {}
            for user_id, track_id, event_type in events:
                if event_type in POSITIVE_EVENT_TYPES:
                    by_user.setdefault(user_id, []).append(track_id)
            for user_id, tracks in by_user.items():
                self.plays.add(user_id, tracks)
                added += len(tracks)
        self._offsets = offsets  # files gone are forgotten
        return added

    @property
    def alive(self) -> bool:
        return self._loop.alive

    def start(self, seconds: float = FOLLOW_SECONDS) -> None:
        self._loop.start(seconds)

    def close(self) -> None:
        self._loop.close()
