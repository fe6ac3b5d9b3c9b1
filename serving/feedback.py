"""Impressions and feedback, landed in the warehouse in batches, made durable before they are lost to a crash.

``/feedback`` answers 202 only once its event is in the **write-ahead log**: a JSON-lines segment
under ``spill_dir`` (``feedback-wal-<pid>-<ns>.jsonl``), written and ``fsync``-ed, and locked
(``flock``) by the process that writes it. Calls that arrive together share one ``fsync`` (group
commit: the first caller writes and syncs everything queued, the others wait for it), so the log
costs one disk sync per batch, not per event.

Impressions (ten per ``/recommend``, acknowledged to no one) are appended to the same log before the
answer, one compact line per list (``["i", request id, user, time, [[track, artist, version,
variant], …]]``: one ``json.dumps`` and one ``write`` per request, 13 µs measured, where ten full
rows cost 50 µs): written to the operating system before the answer, so a ``kill -9`` of the worker loses
none; ``fsync``-ed in batches, every ``SYNC_SECONDS`` by the flush thread or with the next feedback
event's group commit, so a crash of the *machine* may lose the last 0.2 s of them.

Every flush (every ``flush_seconds``) seals the live segment (a new one takes the next events) and
lands every file that no live process holds, each under an exclusive lock held while it lands, then
deletes it: a worker killed by ``kill -9`` leaves its files unlocked, and the next flush of any worker
(or of the restarted one) lands them. Landing is idempotent (the warehouse counts an ``event_id`` it
already has as a duplicate), so a crash between landing and deleting lands nothing twice. If the
warehouse is unavailable the files stay (``recsys_feedback_backlog_events`` grows); beyond
``max_buffer`` rows in memory the buffer is spilled to a JSON-lines file too.

**Where landing runs.** The service's workers land nothing themselves: each starts a *lander*, a child
process (``python -m serving.feedback``) that runs the flushes, while the worker's thread only syncs
and seals. Reading a log back into rows and the warehouse's commit hold a Python interpreter for tens
of milliseconds every flush; in the worker, that interpreter is the one answering ``/recommend``, and
those pauses were its p99 (docs/benchmarks.md, "Serving"). The lander exits when its worker dies
(the next worker's lander, or the restarted one's, lands what was left); a lander that dies while
its worker lives is restarted at the next tick and counted; the worker reports the backlog the
lander last measured.

A file the warehouse refuses for its content (not for being unavailable) is moved to
``spill_dir/quarantine`` with the reason beside it, and never blocks the files behind it; the flush
loop survives any error, counts it, and says whether it is alive (the service's readiness reads it).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
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
SYNC_SECONDS = 0.2  # impressions written since the last fsync are synced at least this often


class LogUnavailable(OSError):
    """The write-ahead log could not take an event (the disk is full, a quota, an I/O error): nothing of
    it is in the log, so it must not be acknowledged."""


class _Segment:
    """The live write-ahead segment: an append-only descriptor, locked by this process, that never keeps
    half a line. A write the disk refuses part-way (``ENOSPC`` after some bytes, ``EDQUOT``, ``EIO``) is
    cut back to the last whole line: a cut line in the middle would send the whole segment, the
    acknowledged events after it too, to the quarantine. Hand-written: Python's buffered files keep the
    refused bytes and write them later, after lines that came in between."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise
        self.size = 0

    def append(self, data: bytes) -> None:
        """Write ``data`` whole, or raise with the segment as it was."""
        written = 0
        try:
            while written < len(data):
                written += os.write(self.fd, data[written:])
        except OSError:
            if written:
                os.ftruncate(self.fd, self.size)  # giving space back: no new block needed
            raise
        self.size += written

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)


class FeedbackWriter:
    def __init__(
        self,
        warehouse: Warehouse | None,
        spill_dir: Path,
        flush_seconds: float = 2.0,
        max_buffer: int = 200_000,
        on_backlog: Callable[[int], None] | None = None,
        lander: bool = False,
        on_lander_restart: Callable[[], None] | None = None,
        on_impressions_dropped: Callable[[int], None] | None = None,
    ):
        """``lander``: land from a child process (the service's mode, see the module's docstring)
        instead of this process's background thread. ``on_impressions_dropped``: told how many
        impressions could not be logged (the log's disk is full: they are dropped, the list is served)."""
        self.on_impressions_dropped = on_impressions_dropped
        self.log_error: str | None = None  # why the log refused the last write; None once one succeeds
        self.on_backlog = on_backlog
        self.lander = lander
        self._lander: subprocess.Popen | None = None
        self.on_lander_restart = on_lander_restart
        self.warehouse = warehouse
        self.spill_dir = spill_dir
        self.flush_seconds = flush_seconds
        self.max_buffer = max_buffer
        self._rows: list[tuple] = []
        self._lock = threading.Lock()
        self._wal_lock = threading.Lock()  # the live segment (opening, writing, sealing)
        # Group commit: callers queue their lines; one of them writes and syncs the whole queue.
        self._commit = threading.Condition()
        self._queued: list[str] = []
        self._queued_rows = 0
        self._enqueued = 0  # calls queued so far (each gets the next number)
        self._synced = 0  # calls whose lines are written and fsync-ed
        self._syncing = False
        self._sync_failures: dict[tuple[int, int], BaseException] = {}  # (first, last) call → why
        self._arrow_rows: dict[str, int] = {}  # impression file → its rows
        self._unsynced = False  # impressions appended since the last fsync
        self._segment = None  # the live write-ahead segment (open, locked by this process)
        self._segment_path: Path | None = None
        self._segment_rows = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.landed = 0
        self.failures = 0
        self.quarantined = 0

    # --- the write-ahead log of acknowledged feedback -------------------------------------------------

    def _new_segment(self) -> tuple[_Segment, Path]:
        """A new segment: created, locked, and its name synced (so that it survives a crash too)."""
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"feedback-wal-{os.getpid()}-{time.time_ns()}.jsonl"
        segment = _Segment(path)
        directory = os.open(self.spill_dir, os.O_RDONLY)
        try:
            os.fsync(directory)
        except OSError:
            segment.close()
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(directory)
        return segment, path

    def _open_segment(self) -> None:
        self._segment, self._segment_path = self._new_segment()
        self._segment_rows = 0

    def log(self, rows: list[tuple]) -> None:
        """Append acknowledged events to the write-ahead log and ``fsync`` it (blocking: call it from a
        thread). When this returns, the events survive a crash of the process or of the machine.

        Raises:
            LogUnavailable: the log could not be written or synced (the caller must not acknowledge).
        """
        if self.warehouse is None:
            return
        lines = "".join(_row_to_json(row) + "\n" for row in rows)
        with self._commit:
            self._queued.append(lines)
            self._queued_rows += len(rows)
            self._enqueued += 1
            mine = self._enqueued
            while self._synced < mine:
                if self._syncing:  # another caller is syncing a batch: wait for it (ours may be in it)
                    self._commit.wait()
                    continue
                batch, n, first, last = "".join(self._queued), self._queued_rows, self._synced + 1, self._enqueued
                self._queued, self._queued_rows, self._syncing = [], 0, True
                failure = None
                self._commit.release()
                try:
                    self._write_synced(batch, n)
                except BaseException as exc:  # noqa: BLE001  (handed to every caller of the batch below)
                    failure = exc
                finally:
                    self._commit.acquire()
                    self._syncing = False
                    self._synced = last
                    if failure is not None:
                        self._sync_failures[first, last] = failure
                    self._commit.notify_all()
            for (first, last), failure in list(self._sync_failures.items()):
                if first <= mine <= last:
                    self.log_error = _reason(failure)
                    raise LogUnavailable(f"the feedback log could not be written: {self.log_error}") from failure
                if last < self._synced - 10_000:
                    del self._sync_failures[first, last]  # long answered
        self.log_error = None

    def append_impressions(self, request_id: str, user_id: str, at: datetime, items: list[tuple]) -> None:
        """Append one served list's impressions to the log (``items``: ``(track_id, artist_id,
        model_version, variant)``), written to the operating system before this returns; synced in
        batches (see the module's docstring). Their event ids are ``imp-<request id>-<rank>``."""
        if self.warehouse is None:
            return
        line = (json.dumps(["i", request_id, user_id, at.isoformat(), items]) + "\n").encode()
        try:
            with self._wal_lock:
                if self._segment is None:
                    self._open_segment()
                self._segment.append(line)  # in the kernel's hands: survives the death of this process
                self._segment_rows += len(items)
                self._unsynced = True
        except OSError as exc:  # a full disk: the list is served, its impressions dropped and counted
            if self.log_error is None:
                log.error("the write-ahead log refuses writes (%s): impressions are dropped", _reason(exc))
            self.log_error = _reason(exc)
            if self.on_impressions_dropped is not None:
                self.on_impressions_dropped(len(items))
            return
        if self.log_error is not None:
            log.warning("the write-ahead log takes writes again")
            self.log_error = None

    # Every fsync runs outside the segment's lock, on a duplicate of its descriptor: a request that
    # appends its impressions never waits for the disk (a sync under the lock was measured as the
    # service's p99 on this VM's disk), and a segment sealed meanwhile stays valid for the sync.

    def sync(self) -> None:
        """``fsync`` what was appended without a sync (the flush thread calls it every SYNC_SECONDS)."""
        with self._wal_lock:
            if not self._unsynced or self._segment is None:
                return
            self._unsynced = False
            fd = os.dup(self._segment.fileno())
        try:
            os.fsync(fd)
        except OSError:
            self._unsynced = True  # tried again at the next tick
            raise
        finally:
            os.close(fd)

    def _write_synced(self, lines: str, rows: int) -> None:
        with self._wal_lock:
            if self._segment is None:
                self._open_segment()
            self._segment.append(lines.encode())
            self._segment_rows += rows
            self._unsynced = False
            fd = os.dup(self._segment.fileno())
        try:
            os.fsync(fd)  # these lines, and the impressions appended before them
        finally:
            os.close(fd)

    def _seal(self) -> None:
        """Hand the live segment to the flush (its lock goes with it when it is closed) and put a new
        one in its place, opened here rather than by the next request that appends."""
        if self._segment is None or not self._segment_rows:
            return  # nothing logged since the last seal
        fresh, fresh_path = self._new_segment()
        with self._wal_lock:
            old = self._segment
            self._segment, self._segment_path, self._segment_rows = fresh, fresh_path, 0
            self._unsynced = False  # the old segment is synced below; the new one is empty
        try:
            os.fsync(old.fileno())
        finally:
            old.close()

    def _landable(self) -> list[Path]:
        """Spill files, write-ahead segments and impression files, oldest first (a live writer's
        segment is skipped when its lock is tried)."""
        if not self.spill_dir.exists():
            return []
        paths = [*self.spill_dir.glob("feedback-*.jsonl"), *self.spill_dir.glob("impressions-*.arrow")]
        return sorted(paths, key=lambda p: p.name.split("-", 1)[1])

    @staticmethod
    def _claim(path: Path):
        """The file opened and exclusively locked (held while it lands), or ``None`` if a live writer
        or another flusher holds it, or it is gone."""
        try:
            handle = open(path, "rb")  # noqa: SIM115  (closed by the caller: the lock lives with it)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        return handle

    def backlog(self) -> int:
        """Events written to the log, the impression files or spilled, and not landed yet, plus those
        buffered in memory. (An impression file's count is read once: the files never change.)"""
        on_disk, present = 0, set()
        for path in self._landable():
            try:
                if path.suffix == ".arrow":
                    present.add(path.name)
                    if path.name not in self._arrow_rows:
                        self._arrow_rows[path.name] = pl.scan_ipc(path).select(pl.len()).collect().item()
                    on_disk += self._arrow_rows[path.name]
                else:
                    with open(path, "rb") as f:
                        on_disk += sum(1 for _ in f)
            except (FileNotFoundError, pl.exceptions.PolarsError, OSError):
                continue
        for gone in set(self._arrow_rows) - present:
            del self._arrow_rows[gone]
        return on_disk + len(self._rows)

    def start(self) -> None:
        if self.warehouse is None or self._thread is not None:
            return
        self.warehouse.init_schema()
        if self.lander:
            self._start_lander()
        self._thread = threading.Thread(target=self._run, name="feedback-writer", daemon=True)
        self._thread.start()

    # --- the lander (a child process) -------------------------------------------------------------

    @property
    def _status_path(self) -> Path:
        return self.spill_dir / f".lander-{os.getpid()}.json"

    def _start_lander(self) -> None:
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "serving.feedback", str(self.spill_dir),
                   "--flush-seconds", str(self.flush_seconds), "--parent", str(os.getpid())]  # fmt: skip
        # The URI travels in the environment, not in the arguments (``ps`` shows arguments to everyone).
        env = {**os.environ, "RECSYS_WAREHOUSE_URI": self.warehouse.uri}
        root = str(Path(__file__).resolve().parents[1])  # where `serving` is importable from, whatever the cwd
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self._lander = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)

    def _watch_lander(self) -> None:
        """Restart a lander that died while this process lives; report the backlog it last measured."""
        if self._lander is not None and self._lander.poll() is not None:
            log.error("the feedback lander exited (%s): restarting it", self._lander.returncode)
            self._start_lander()
            if self.on_lander_restart is not None:  # counted once the new one runs
                self.on_lander_restart()
        if self.on_backlog is not None:
            with contextlib.suppress(FileNotFoundError):  # its first flush is not done yet
                self.on_backlog(json.loads(self._status_path.read_text())["backlog"])

    def _stop_lander(self) -> None:
        if self._lander is None or self._lander.poll() is not None:
            return
        self._lander.terminate()  # it lands what is sealed, then exits
        try:
            self._lander.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._lander.kill()
            self._lander.wait()
        self._status_path.unlink(missing_ok=True)

    def add(self, rows: list[tuple]) -> None:
        """Buffer events as tuples in ``LISTENING_EVENTS_SCHEMA`` column order (dropped when there is no
        warehouse: ``RECSYS_WAREHOUSE_URI=none``, the benchmarks' mode)."""
        if self.warehouse is None:
            return
        with self._lock:
            self._rows.extend(rows)
            overflow = len(self._rows) > self.max_buffer
        if overflow:
            self._spill()

    def _take(self) -> list[tuple]:
        with self._lock:
            rows, self._rows = self._rows, []
        return rows

    def _convert(self) -> None:
        """Buffered impressions → one Arrow IPC file in the spill directory (written aside, synced,
        renamed: a reader never sees half a file)."""
        rows = self._take()
        if not rows:
            return
        frame = pl.DataFrame(rows, schema=LISTENING_EVENTS_SCHEMA, orient="row")
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"impressions-{time.time_ns()}-{os.getpid()}.arrow"
        tmp = self.spill_dir / f".{path.name}.tmp"
        try:
            frame.write_ipc(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            tmp.replace(path)
        except OSError:
            with self._lock:  # kept in memory for the next try (and counted in the backlog)
                self._rows[:0] = rows
            raise

    def _spill(self) -> None:
        rows = self._take()
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
        """Land every file no live process holds; keep them if the warehouse refuses."""
        if self.warehouse is None:
            return 0
        landed = 0
        self._seal()
        self._convert()
        for path in self._landable():
            handle = self._claim(path)
            if handle is None:
                continue  # a live writer's segment, or another worker lands it now
            try:
                try:
                    frame = self._read(path)
                except FileNotFoundError:
                    continue
                except (ValueError, TypeError, IndexError, OSError, pl.exceptions.PolarsError) as exc:
                    self._quarantine(path, f"{type(exc).__name__}: {exc}")
                    continue
                if frame.is_empty():  # a segment that a killed worker had just opened
                    path.unlink(missing_ok=True)
                    continue
                try:
                    landed += self._land_frame(frame, origin=f"serving {path.name}")
                except WarehouseError as exc:
                    self.failures += 1
                    log.warning("feedback %s not landed yet (kept for the next flush): %s", path.name, exc)
                    return landed
                except (ValueError, TypeError, IndexError, pl.exceptions.PolarsError) as exc:
                    self._quarantine(path, f"{type(exc).__name__}: {exc}")
                    continue
                path.unlink(missing_ok=True)
            finally:
                handle.close()
        return landed

    def _read(self, path: Path) -> pl.DataFrame:
        """The events of an impression file, spill file or write-ahead segment. A segment's last line
        without its newline is a write cut by a crash, never acknowledged (the answer waits for the
        fsync): it is set aside in the quarantine, and the lines before it land."""
        if path.suffix == ".arrow":
            return pl.read_ipc(path)
        text = path.read_text()
        lines = text.splitlines()
        if path.name.startswith("feedback-wal-") and text and not text.endswith("\n"):
            torn = self.spill_dir / "quarantine" / f"{path.name}.torn"
            torn.parent.mkdir(parents=True, exist_ok=True)
            torn.write_text(lines.pop() + "\n")
            log.warning("write-ahead segment %s ended in a torn write (not acknowledged): set aside", path.name)
        rows = [row for line in lines if line.strip() for row in _rows_from_json(line)]
        return pl.DataFrame(rows, schema=LISTENING_EVENTS_SCHEMA, orient="row")

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
        """Whether the flush loop runs (or none is needed: no warehouse), and its lander if it has one
        (a dead lander is restarted at the next tick: between, the backlog grows)."""
        if self.warehouse is None:
            return True
        running = self._thread is not None and self._thread.is_alive()
        return running and (self._lander is None or self._lander.poll() is None)

    def _land_frame(self, frame: pl.DataFrame, origin: str) -> int:
        report = self.warehouse.land_events(frame, source="serving-feedback", origin=origin)
        self.landed += report.landed
        return report.landed

    def _run(self) -> None:
        tick = min(CONVERT_SECONDS, SYNC_SECONDS, self.flush_seconds)
        last_flush = time.monotonic()
        while not self._stop.wait(tick):
            try:
                self.sync()
                if time.monotonic() - last_flush >= self.flush_seconds:
                    last_flush = time.monotonic()
                    if self.lander:  # the lander lands what is sealed
                        self._seal()
                        self._convert()
                        self._watch_lander()
                    else:
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
        self._seal()
        self._stop_lander()
        self.flush()
        with self._wal_lock:
            if self._segment is not None:  # empty: nothing was logged since the last flush
                self._segment.close()
                self._segment = None
                if self._segment_path is not None and self._segment_path.stat().st_size == 0:
                    self._segment_path.unlink()
        if self._rows:
            self._spill()


def _reason(exc: BaseException) -> str:
    """Why the log refused a write, as an operator reads it (``ENOSPC: No space left on device``)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        import errno

        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"


def _row_to_json(row: tuple) -> str:
    return json.dumps([v.isoformat() if isinstance(v, datetime) else v for v in row])


IMPRESSIONS_PREFIX = b'["i"'  # how a list's impressions line starts (see the module docstring)
_USER, _TRACK, _TYPE = (list(LISTENING_EVENTS_SCHEMA).index(c) for c in ("user_id", "track_id", "event_type"))


def logged_plays(lines: bytes) -> tuple[list[tuple[str, str, str]], int]:
    """The (user, track, event type) of each event in complete log lines, impressions skipped (for
    a reader that follows a log without landing it), and how many lines were not valid JSON."""
    events, invalid = [], 0
    for line in lines.splitlines():
        if line.startswith(IMPRESSIONS_PREFIX):
            continue
        try:
            row = json.loads(line)
        except ValueError:
            invalid += 1
            continue
        events.append((row[_USER], row[_TRACK], row[_TYPE]))
    return events, invalid


def _rows_from_json(line: str) -> list[tuple]:
    """A log line back as the tuples :func:`event_row` makes: one event, or one list's impressions."""
    row = json.loads(line)
    if row and row[0] == "i":  # ["i", request id, user, time, [[track, artist, version, variant], …]]
        _, request_id, user_id, at, items = row
        at = datetime.fromisoformat(at)
        return [
            event_row(event_id=f"imp-{request_id}-{rank}", user_id=user_id, track_id=track, artist_id=artist,
                      event_type="impression", model_version=version, variant=variant, at=at)
            for rank, (track, artist, version, variant) in enumerate(items)
        ]  # fmt: skip
    if row[4] is not None:
        row[4] = datetime.fromisoformat(row[4])
    return [tuple(row)]


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


def _land_until_orphaned(spill_dir: Path, flush_seconds: float, parent: int) -> None:
    """The lander's loop: land every ``flush_seconds`` and write the backlog for the parent to report,
    until the parent is gone or asks to stop (SIGTERM), then land once more."""
    from recsys_core.settings import load_settings

    # Background work: when the cores are contended, the worker's requests go first (CFS weight 110
    # against 1024), and the landing catches up in the gaps (the backlog gauge shows if it does not).
    os.nice(10)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    writer = FeedbackWriter(Warehouse(load_settings().warehouse_uri), spill_dir, flush_seconds)
    writer.warehouse.init_schema()
    status = spill_dir / f".lander-{parent}.json"
    next_flush = 0.0
    while not stop.is_set() and os.getppid() == parent:
        if time.monotonic() >= next_flush:
            next_flush = time.monotonic() + flush_seconds
            try:
                writer.flush()
                tmp = status.with_name(status.name + ".tmp")
                counts = {"backlog": writer.backlog(), "landed": writer.landed, "failures": writer.failures,
                          "quarantined": writer.quarantined}  # fmt: skip
                tmp.write_text(json.dumps(counts))
                tmp.replace(status)
            except Exception:  # a background loop survives anything: logged, counted, retried
                writer.failures += 1
                log.exception("feedback flush failed; retrying at the next flush")
        stop.wait(min(flush_seconds, 0.5))  # the parent's death is seen within half a second
    writer.flush()


def land_once(spill_dir: Path) -> int:
    """Land every file of a write-ahead log no live process holds (a replica's volume whose pod is gone:
    ``deploy/k8s/wal-recovery.yaml``); the number of events left, 0 when all of it landed."""
    from recsys_core.settings import load_settings

    writer = FeedbackWriter(Warehouse(load_settings().warehouse_uri), spill_dir, flush_seconds=0)
    writer.warehouse.init_schema()
    landed = writer.flush()
    left = writer.backlog()
    log.info("landed %d events from %s; %d left", landed, spill_dir, left)
    return left


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Land the service's write-ahead log (started by a worker).")
    parser.add_argument("spill_dir", type=Path)
    parser.add_argument("--flush-seconds", type=float, default=2.0)
    parser.add_argument("--parent", type=int, help="the worker: exit when it is gone")
    parser.add_argument("--once", action="store_true", help="land what is there and exit (1 if some is left)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s lander %(levelname)s %(message)s")
    if args.once:
        sys.exit(1 if land_once(args.spill_dir) else 0)
    if args.parent is None:
        parser.error("--parent is required (or --once)")
    _land_until_orphaned(args.spill_dir, args.flush_seconds, args.parent)
