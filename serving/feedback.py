"""Impressions and feedback, landed in the warehouse in batches; acknowledged feedback first made durable.

``/feedback`` answers 202 only once its event is in the **write-ahead log**: a JSON-lines segment
under ``spill_dir`` (``feedback-wal-<pid>-<ns>.jsonl``), written and ``fsync``-ed (in a thread, so the
event loop does not wait on the disk) and locked (``flock``) by the process that writes it. Each
flush seals the live segment (a new one takes the next events) and lands every segment that no live
process holds, then deletes it: a worker killed by ``kill -9`` leaves its segments unlocked, and the
next flush of any worker (or of the restarted one) lands them. Landing is idempotent (the warehouse
counts an ``event_id`` it already has as a duplicate), so a crash between landing and deleting
lands nothing twice.

Impressions are produced by the service, not acknowledged to anyone, and are many: they stay in the
memory buffer below.

Every served recommendation becomes ``impression`` events and every ``/feedback`` call an event, in
the listening-events contract (``source = recommendation`` with ``model_version`` and ``variant``), so
they feed the next training and the online metrics. A background thread lands the buffer every
``flush_seconds`` through :meth:`Warehouse.land_events`, the same path as all other data. If the
warehouse is unavailable the rows stay buffered; beyond ``max_buffer`` rows they are spilled to a JSON
lines file under ``spill_dir`` (landed later by :meth:`FeedbackWriter.flush`), so nothing is lost.

The thread turns the buffered tuples into a polars frame every ``CONVERT_SECONDS`` (a few thousand rows
at a time) and lands the frames together every ``flush_seconds``: converting Python tuples holds the
interpreter lock, and a conversion of everything every 2 s (30,000 rows at 1,500 req/s: 60–80 ms)
stalled every request in flight (the serving benchmark's p99).

A spilled file the warehouse refuses for its content (not for being unavailable) is moved to
``spill_dir/quarantine`` with the reason beside it, and never blocks the files behind it; the flush
loop survives any error, counts it, and says whether it is alive (the service's readiness reads it).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from recsys_core.contracts import LISTENING_EVENTS_SCHEMA
from recsys_core.warehouse import Warehouse, WarehouseError

log = logging.getLogger(__name__)

CONVERT_SECONDS = 0.2


class FeedbackWriter:
    def __init__(
        self,
        warehouse: Warehouse | None,
        spill_dir: Path,
        flush_seconds: float = 2.0,
        max_buffer: int = 200_000,
        on_backlog: Callable[[int], None] | None = None,
    ):
        self.on_backlog = on_backlog
        self.warehouse = warehouse
        self.spill_dir = spill_dir
        self.flush_seconds = flush_seconds
        self.max_buffer = max_buffer
        self._rows: list[tuple] = []
        self._frames: list[pl.DataFrame] = []  # converted, not landed yet (the flush thread's)
        self._framed = 0  # rows in _frames
        self._lock = threading.Lock()
        self._frames_lock = threading.Lock()
        self._wal_lock = threading.Lock()
        self._segment = None  # the live write-ahead segment (open, locked by this process)
        self._segment_path: Path | None = None
        self._segment_rows = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.landed = 0
        self.failures = 0
        self.quarantined = 0

    # --- the write-ahead log of acknowledged feedback -------------------------------------------------

    def _open_segment(self) -> None:
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"feedback-wal-{os.getpid()}-{time.time_ns()}.jsonl"
        handle = open(path, "a", encoding="utf-8")  # noqa: SIM115  (held open: the live segment)
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        directory = os.open(self.spill_dir, os.O_RDONLY)
        try:
            os.fsync(directory)  # the new name survives a crash too
        finally:
            os.close(directory)
        self._segment, self._segment_path, self._segment_rows = handle, path, 0

    def log(self, rows: list[tuple]) -> None:
        """Append acknowledged events to the write-ahead log and ``fsync`` it (blocking: call it from a
        thread). When this returns, the events survive a crash of the process or of the machine."""
        if self.warehouse is None:
            return
        lines = "".join(_row_to_json(row) + "\n" for row in rows)
        with self._wal_lock:
            if self._segment is None:
                self._open_segment()
            self._segment.write(lines)
            self._segment.flush()
            os.fsync(self._segment.fileno())
            self._segment_rows += len(rows)

    def _seal(self) -> None:
        """Close the live segment (its lock goes with it) so the flush can land it."""
        with self._wal_lock:
            if self._segment is not None and self._segment_rows:
                self._segment.close()
                self._segment = None

    def _landable(self) -> list[Path]:
        """Spill files and write-ahead segments that no live process holds, oldest first."""
        if not self.spill_dir.exists():
            return []
        free = []
        for path in sorted(self.spill_dir.glob("feedback-*.jsonl")):
            try:
                with open(path, "rb") as probe:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on close
            except BlockingIOError:
                continue  # a live writer's segment (this process's own included)
            except FileNotFoundError:
                continue
            free.append(path)
        return free

    def backlog(self) -> int:
        """Events written to the log or spilled and not landed yet, plus those buffered in memory."""
        files = self.spill_dir.glob("feedback-*.jsonl") if self.spill_dir.exists() else []
        on_disk = 0
        for path in files:
            try:
                with open(path, "rb") as f:
                    on_disk += sum(1 for _ in f)
            except FileNotFoundError:
                continue
        return on_disk + len(self._rows) + self._framed

    def start(self) -> None:
        if self.warehouse is None or self._thread is not None:
            return
        self.warehouse.init_schema()
        self._thread = threading.Thread(target=self._run, name="feedback-writer", daemon=True)
        self._thread.start()

    def add(self, rows: list[tuple]) -> None:
        """Buffer events as tuples in ``LISTENING_EVENTS_SCHEMA`` column order (dropped when there is no
        warehouse: ``RECSYS_WAREHOUSE_URI=none``, the benchmarks' mode)."""
        if self.warehouse is None:
            return
        with self._lock:
            self._rows.extend(rows)
            overflow = len(self._rows) + self._framed > self.max_buffer
        if overflow:
            self._spill()

    def _take(self) -> list[tuple]:
        with self._lock:
            rows, self._rows = self._rows, []
        return rows

    def _convert(self) -> None:
        """Buffered tuples → one more frame (a short hold of the interpreter lock)."""
        rows = self._take()
        if rows:
            frame = pl.DataFrame(rows, schema=LISTENING_EVENTS_SCHEMA, orient="row")
            with self._frames_lock:
                self._frames.append(frame)
                self._framed += frame.height

    def _take_frames(self) -> list[pl.DataFrame]:
        with self._frames_lock:
            frames, self._frames, self._framed = self._frames, [], 0
        return frames

    def _put_back(self, frames: list[pl.DataFrame]) -> None:
        with self._frames_lock:
            self._frames[:0] = frames
            self._framed += sum(f.height for f in frames)

    def _spill(self) -> None:
        rows = [row for frame in self._take_frames() for row in frame.rows()] + self._take()
        if not rows:
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"feedback-{time.time_ns()}.jsonl"
        # Written aside and renamed: another worker's flush must never read a half-written spill file.
        tmp = self.spill_dir / f".{path.name}.tmp"
        with open(tmp, "w") as f:
            for row in rows:
                f.write(_row_to_json(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        log.warning("warehouse unavailable: spilled %d feedback events to %s", len(rows), path)

    def flush(self) -> int:
        landed = self._flush()
        if self.on_backlog is not None:
            self.on_backlog(self.backlog())
        return landed

    def _flush(self) -> int:
        """Land the buffer (and any spilled files); keep everything if the warehouse refuses."""
        if self.warehouse is None:
            return 0
        landed = 0
        self._seal()
        for path in self._landable():
            try:
                rows = self._read(path)
            except FileNotFoundError:
                continue  # another worker landed it meanwhile
            except (ValueError, TypeError, IndexError) as exc:
                self._quarantine(path, f"{type(exc).__name__}: {exc}")
                continue
            try:
                landed += self._land(rows, origin=f"serving {path.name}")
            except WarehouseError as exc:
                log.warning("spilled feedback %s not landed yet: %s", path, exc)
                return landed
            except (ValueError, TypeError, IndexError, pl.exceptions.PolarsError) as exc:
                self._quarantine(path, f"{type(exc).__name__}: {exc}")
                continue
            path.unlink(missing_ok=True)
        self._convert()
        frames = self._take_frames()
        if not frames:
            return landed
        try:
            landed += self._land_frame(pl.concat(frames, rechunk=False), origin="serving-feedback")
        except WarehouseError as exc:
            self.failures += 1
            log.warning("landing %d feedback events failed, kept for the next flush: %s",
                        sum(f.height for f in frames), exc)  # fmt: skip
            self._put_back(frames)
        return landed

    def _read(self, path: Path) -> list[tuple]:
        """The rows of a spill file or write-ahead segment. A segment's last line without its newline is
        a write cut by a crash, never acknowledged (the answer waits for the fsync): it is set aside in
        the quarantine, and the lines before it land."""
        text = path.read_text()
        lines = text.splitlines()
        if path.name.startswith("feedback-wal-") and text and not text.endswith("\n"):
            torn = self.spill_dir / "quarantine" / f"{path.name}.torn"
            torn.parent.mkdir(parents=True, exist_ok=True)
            torn.write_text(lines.pop() + "\n")
            log.warning("write-ahead segment %s ended in a torn write (not acknowledged): set aside", path.name)
        return [_row_from_json(line) for line in lines if line.strip()]

    def _quarantine(self, path: Path, reason: str) -> None:
        """Set aside a spilled file whose content cannot be landed, with the reason beside it."""
        target = self.spill_dir / "quarantine" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)
        target.with_suffix(".reason.txt").write_text(reason + "\n")
        self.quarantined += 1
        log.error("spilled feedback %s cannot be landed (%s): moved to %s", path.name, reason, target)

    @property
    def alive(self) -> bool:
        """Whether the flush loop runs (or none is needed: no warehouse)."""
        return self.warehouse is None or (self._thread is not None and self._thread.is_alive())

    def _land(self, rows: list[tuple], origin: str) -> int:
        return self._land_frame(pl.DataFrame(rows, schema=LISTENING_EVENTS_SCHEMA, orient="row"), origin)

    def _land_frame(self, frame: pl.DataFrame, origin: str) -> int:
        report = self.warehouse.land_events(frame, source="serving-feedback", origin=origin)
        self.landed += report.landed
        return report.landed

    def _run(self) -> None:
        tick = min(CONVERT_SECONDS, self.flush_seconds)
        last_flush = time.monotonic()
        while not self._stop.wait(tick):
            try:
                if time.monotonic() - last_flush >= self.flush_seconds:
                    last_flush = time.monotonic()
                    self.flush()
                else:
                    self._convert()
            except Exception:  # a background loop survives anything: logged, counted, retried
                self.failures += 1
                log.exception("feedback flush failed; retrying at the next flush")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()
        with self._wal_lock:
            if self._segment is not None:  # empty: nothing was logged since the last flush
                self._segment.close()
                self._segment = None
                if self._segment_path is not None and self._segment_path.stat().st_size == 0:
                    self._segment_path.unlink()
        if self._rows or self._framed:
            self._spill()


def _row_to_json(row: tuple) -> str:
    return json.dumps([v.isoformat() if isinstance(v, datetime) else v for v in row])


def _row_from_json(line: str) -> tuple:
    """A spilled row back as the tuple :func:`event_row` made (its time parsed back)."""
    row = json.loads(line)
    if row[4] is not None:
        row[4] = datetime.fromisoformat(row[4])
    return tuple(row)


def event_row(
    *,
    event_id: str,
    user_id: str,
    track_id: str,
    artist_id: str | None,
    event_type: str,
    model_version: int | None,
    variant: str | None,
    at: datetime | None = None,
) -> tuple:
    """One event as a tuple in ``LISTENING_EVENTS_SCHEMA`` order."""
    return (
        event_id,
        user_id,
        track_id,
        artist_id,
        at or datetime.now(UTC),
        None,
        None,
        event_type,
        "recommendation",
        None if model_version is None else str(model_version),
        variant,
    )
