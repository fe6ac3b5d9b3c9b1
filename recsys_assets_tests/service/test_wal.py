"""Acknowledged feedback survives a crash: the write-ahead log (serving/feedback.py)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from recsys_assets_tests.conftest import REPO_ROOT
from recsys_assets_tests.service.test_replicas import until
from recsys_cli.stack.services import bento_spec
from recsys_cli.stack.supervisor import Stack, free_port
from recsys_core.settings import load_settings
from recsys_core.warehouse import Warehouse
from serving.feedback import FeedbackWriter, LogUnavailable, event_row


def row(i: int, prefix: str = "w") -> tuple:
    return event_row(event_id=f"{prefix}-{i}", user_id="u1", track_id="t1", artist_id=None, event_type="click",
                     model_version=1, variant="champion")  # fmt: skip


def landed_ids(warehouse: Warehouse, prefix: str) -> set[str]:
    warehouse.init_schema()
    rows = warehouse.fetch("SELECT event_id FROM listening_events WHERE event_id LIKE ?", [f"{prefix}-%"])
    return set(rows["event_id"].to_list())


def test_a_logged_event_lands_after_its_writer_died(tmp_path: Path) -> None:
    """A writer that logged events and died without flushing (its segment's lock released, as by the
    kernel on kill -9) leaves them for the next writer, which lands each once."""
    warehouse = Warehouse(f"duckdb:///{tmp_path / 'w.duckdb'}")
    warehouse.init_schema()
    dead = FeedbackWriter(warehouse, spill_dir=tmp_path / "spill", flush_seconds=3600)
    dead.log([row(i) for i in range(50)])
    assert dead.backlog() == 50
    dead._segment.close()  # the crash: no flush, no close(); the lock goes with the file
    survivor = FeedbackWriter(warehouse, spill_dir=tmp_path / "spill", flush_seconds=3600)
    assert survivor.flush() == 50
    assert landed_ids(warehouse, "w") == {f"w-{i}" for i in range(50)}
    assert survivor.flush() == 0
    assert not list((tmp_path / "spill").glob("feedback-*.jsonl"))


def test_a_torn_last_line_is_set_aside_and_the_rest_lands(tmp_path: Path) -> None:
    """kill -9 in the middle of a write leaves a line without its newline: never acknowledged."""
    warehouse = Warehouse(f"duckdb:///{tmp_path / 'w.duckdb'}")
    warehouse.init_schema()
    dead = FeedbackWriter(warehouse, spill_dir=tmp_path / "spill", flush_seconds=3600)
    dead.log([row(i, "torn") for i in range(3)])
    os.write(dead._segment.fileno(), b'["torn-3", "u1", "t1"')  # cut mid-line, as the kernel leaves it
    dead._segment.close()
    survivor = FeedbackWriter(warehouse, spill_dir=tmp_path / "spill", flush_seconds=3600)
    assert survivor.flush() == 3
    assert landed_ids(warehouse, "torn") == {"torn-0", "torn-1", "torn-2"}
    assert len(list((tmp_path / "spill" / "quarantine").glob("*.torn"))) == 1


def test_a_live_writers_segment_is_left_to_it(tmp_path: Path) -> None:
    warehouse = Warehouse(f"duckdb:///{tmp_path / 'w.duckdb'}")
    warehouse.init_schema()
    live = FeedbackWriter(warehouse, spill_dir=tmp_path / "spill", flush_seconds=3600)
    live.log([row(i, "live") for i in range(5)])
    other = FeedbackWriter(warehouse, spill_dir=tmp_path / "spill", flush_seconds=3600)
    assert other.flush() == 0  # the segment is locked by its writer
    assert live.flush() == 5  # its own flush seals and lands it
    assert landed_ids(warehouse, "live") == {f"live-{i}" for i in range(5)}


@pytest.mark.integration
@pytest.mark.slow
def test_no_acknowledged_feedback_is_lost_to_kill_9(serving_home, tmp_path: Path) -> None:
    """`bentoml serve` acknowledges feedback from many clients, is killed with SIGKILL (every process)
    before any flush, and its log's volume is given to another replica (another home, another port: a
    new pod that takes the claim): every acknowledged event lands, once. So does every impression of the
    lists it answered (in the log before the answer)."""
    home = tmp_path / "home"
    shutil.copytree(serving_home.home, home, ignore=shutil.ignore_patterns("warehouse.duckdb*", "serving"))
    volume = tmp_path / "volume"  # the replica's volume claim
    settings = load_settings({"RECSYS_HOME": str(home), "RECSYS_BENTO_PORT": str(free_port()),
                              "RECSYS_FEEDBACK_LOG_DIR": str(volume)})  # fmt: skip
    env = {**serving_home.env, **settings.child_env({}), "RECSYS_FEEDBACK_FLUSH_SECONDS": "3600",
           "RECSYS_FEEDBACK_LOG_DIR": str(volume)}  # fmt: skip
    stack = Stack(tmp_path / "run", env=env, cwd=REPO_ROOT)
    stack.start([bento_spec(settings)], timeout=180)
    acknowledged: list[str] = []
    served: list[str] = []  # request ids of the lists served: 5 impressions each
    lock = threading.Lock()

    def client(n: int) -> None:
        with httpx.Client(base_url=settings.url("bento"), timeout=10) as http:
            for i in range(500):
                event_id = f"kill9-{n}-{i}"
                response = http.post("/feedback", json={"user_id": f"k{n}", "track_id": "t1", "event_type": "click",
                                                        "event_id": event_id})  # fmt: skip
                if response.status_code == 202:
                    with lock:
                        acknowledged.append(event_id)
                if i % 10 == 0:
                    listed = http.post("/recommend", json={"user_id": f"u{1 + n}", "k": 5})
                    with lock:
                        served.append(listed.json()["request_id"])

    try:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for pid in stack.all_pids():
            if psutil.pid_exists(pid):
                psutil.Process(pid).kill()
        stack.stop(grace=5)
    assert len(acknowledged) == 2000
    warehouse = Warehouse(settings.warehouse_uri)
    assert not landed_ids(warehouse, "kill9")  # nothing had landed: all of it was only in the log
    assert list(volume.glob("feedback-wal-*.jsonl"))

    other = tmp_path / "home-b"  # the next pod: its own home and port, the same volume and warehouse
    shutil.copytree(serving_home.home, other, ignore=shutil.ignore_patterns("warehouse.duckdb*", "serving"))
    successor = load_settings({"RECSYS_HOME": str(other), "RECSYS_BENTO_PORT": str(free_port()),
                               "RECSYS_WAREHOUSE_URI": settings.warehouse_uri,
                               "RECSYS_FEEDBACK_LOG_DIR": str(volume)})  # fmt: skip
    env = {**serving_home.env, **successor.child_env({}), "RECSYS_FEEDBACK_FLUSH_SECONDS": "0.5",
           "RECSYS_FEEDBACK_LOG_DIR": str(volume)}  # fmt: skip
    again = Stack(tmp_path / "run-again", env=env, cwd=REPO_ROOT)
    again.start([bento_spec(successor)], timeout=180)
    try:
        until(lambda: len(landed_ids(warehouse, "kill9")) >= 2000, 60, "the logged feedback to land")
        assert landed_ids(warehouse, "kill9") == set(acknowledged)
        count = warehouse.scalar("SELECT COUNT(*) FROM listening_events WHERE event_id LIKE 'kill9-%'")
        assert count == 2000  # once each
        until(lambda: len(landed_ids(warehouse, "imp")) >= 5 * len(served), 60, "the impressions to land")
        assert landed_ids(warehouse, "imp") == {f"imp-{r}-{rank}" for r in served for rank in range(5)}
    finally:
        again.stop(grace=20)


def test_concurrent_acknowledgements_share_their_fsyncs(tmp_path: Path, monkeypatch) -> None:
    """Group commit: 8 threads × 50 events; each call returns only once its event is synced, and the
    calls that arrive together share one fsync. A failed sync fails every call of its batch."""
    import serving.feedback as feedback

    warehouse = Warehouse(f"duckdb:///{tmp_path / 'w.duckdb'}")
    writer = FeedbackWriter(warehouse, spill_dir=tmp_path / "spill", flush_seconds=3600)
    syncs, real_fsync = [], os.fsync

    def slow_fsync(fd: int) -> None:
        syncs.append(fd)
        time.sleep(0.002)  # a disk's sync time, so that calls pile up behind it
        real_fsync(fd)

    monkeypatch.setattr(feedback.os, "fsync", slow_fsync)
    threads = [threading.Thread(target=lambda n=n: [writer.log([row(i, f"g{n}")]) for i in range(50)])
               for n in range(8)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    segment = writer._segment_path.read_text().splitlines()
    assert len(segment) == 400
    assert len(syncs) - 1 < 200  # (one is the directory's, at the segment's creation)

    def broken(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(feedback.os, "fsync", broken)
    with pytest.raises(OSError, match="could not be written"):
        writer.log([row(0, "full")])


def test_the_lander_lands_from_its_own_process_and_is_restarted_when_it_dies(tmp_path: Path) -> None:
    """The service's mode: the worker only logs and seals; a child process lands. A lander killed with
    SIGKILL is restarted (and counted), and nothing logged is lost to it."""
    warehouse = Warehouse(f"duckdb:///{tmp_path / 'w.duckdb'}")
    restarts: list[int] = []
    backlog: list[int] = []
    writer = FeedbackWriter(warehouse, spill_dir=tmp_path / "spill", flush_seconds=0.2, lander=True,
                            on_lander_restart=lambda: restarts.append(1), on_backlog=backlog.append)  # fmt: skip
    writer.start()
    try:
        first = writer._lander.pid
        assert first != os.getpid()
        writer.log([row(i, "lander") for i in range(20)])
        until(lambda: len(landed_ids(warehouse, "lander")) == 20, 60, "the lander to land the log")
        until(lambda: backlog and backlog[-1] == 0, 30, "the lander's backlog to reach the worker")
        assert writer.landed == 0  # none of it landed in this process

        psutil.Process(first).kill()
        until(lambda: restarts, 30, "the dead lander to be restarted")
        assert writer._lander.pid != first
        until(lambda: writer.alive, 30, "the writer to be alive again")
        writer.log([row(i, "after") for i in range(5)])
        until(lambda: len(landed_ids(warehouse, "after")) == 5, 60, "the new lander to land")
    finally:
        writer.close()
    assert writer._lander.poll() is not None  # stopped with its writer
    assert not list((tmp_path / "spill").glob(".lander-*"))


def test_a_lander_whose_worker_died_lands_what_is_left_and_exits(tmp_path: Path) -> None:
    """kill -9 of a worker: its lander (now an orphan) lands the worker's log and exits by itself."""
    warehouse = Warehouse(f"duckdb:///{tmp_path / 'w.duckdb'}")
    spill = tmp_path / "spill"
    writer = FeedbackWriter(warehouse, spill_dir=spill, flush_seconds=3600)
    writer.log([row(i, "orphan") for i in range(7)])
    writer._segment.close()  # as a killed worker's segment: written, synced, unlocked
    env = {**os.environ, "RECSYS_WAREHOUSE_URI": warehouse.uri, "PYTHONPATH": str(REPO_ROOT)}
    # A shell starts the lander as its child, then becomes `sleep` (same pid): the lander's parent.
    shell = psutil.Popen(
        ["sh", "-c", f'"$0" -m serving.feedback {spill} --flush-seconds 3600 --parent $$ & exec sleep 600',
         os.sys.executable], env=env,
    )  # fmt: skip
    until(lambda: shell.children(), 30, "the lander to start")
    lander = shell.children()[0]
    shell.kill()
    shell.wait()
    lander.wait(timeout=60)  # exits by itself, though its flush interval is an hour
    assert landed_ids(warehouse, "orphan") == {f"orphan-{i}" for i in range(7)}


def test_a_write_the_disk_refuses_part_way_leaves_whole_lines_and_acknowledges_nothing(tmp_path, monkeypatch) -> None:
    """ENOSPC injected at the os.write boundary, after part of the bytes (what a filling disk does):
    the impressions are dropped and counted, the feedback is refused, the segment is cut back to its
    whole lines, and once writes succeed again everything acknowledged lands, nothing refused does."""
    import errno

    import serving.feedback as feedback

    warehouse = Warehouse(f"duckdb:///{tmp_path / 'w.duckdb'}")
    warehouse.init_schema()
    dropped: list[int] = []
    writer = FeedbackWriter(warehouse, spill_dir=tmp_path / "spill", flush_seconds=3600,
                            on_impressions_dropped=dropped.append)  # fmt: skip
    at = row(0)[4]
    writer.log([row(i, "full") for i in range(3)])
    writer.append_impressions("r1", "u1", at, [("t1", "a1", 1, "champion")] * 3)
    real_write = os.write

    def full_disk(fd: int, data) -> int:
        if fd == writer._segment.fileno():
            if len(data) > 8:
                return real_write(fd, bytes(data[:8]))  # part of it fits
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(feedback.os, "write", full_disk)
    writer.append_impressions("r2", "u1", at, [("t2", "a1", 1, "champion")] * 4)  # no exception: dropped
    assert dropped == [4]
    assert writer.log_error == "ENOSPC: No space left on device"
    with pytest.raises(LogUnavailable, match="No space left on device"):
        writer.log([row(i, "refused") for i in range(2)])
    size = writer._segment.size
    assert writer._segment_path.stat().st_size == size  # cut back: no half line
    assert writer._segment_path.read_bytes().endswith(b"\n")

    monkeypatch.setattr(feedback.os, "write", real_write)  # space is back
    writer.log([row(3, "full")])
    assert writer.log_error is None
    writer.append_impressions("r3", "u1", at, [("t3", "a1", 1, "champion")])
    assert writer.flush() == 3 + 1 + 3 + 1
    assert landed_ids(warehouse, "full") == {f"full-{i}" for i in range(4)}
    assert not landed_ids(warehouse, "refused")
    assert landed_ids(warehouse, "imp") == {"imp-r1-0", "imp-r1-1", "imp-r1-2", "imp-r3-0"}
    assert not list((tmp_path / "spill" / "quarantine").glob("*"))  # nothing was set aside
