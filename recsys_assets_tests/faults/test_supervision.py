"""`recsys up` supervises its processes: one that dies is restarted, with backoff; logs are rotated.

Real processes: a server that forks a worker holding the port (as the MLflow and Dagster servers do),
killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from recsys_assets_tests.service.test_replicas import until
from recsys_cli.stack.supervisor import ServiceSpec, Stack, free_port, rotate_log

pytestmark = [pytest.mark.faults]

SERVER = """
import http.server, os, sys
port = int(sys.argv[1])
if os.fork() == 0:  # the worker holds the port; the leader only waits
    http.server.HTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler).serve_forever()
os.wait()
"""


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_killed_process_is_restarted_with_backoff_and_its_leftovers_go(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    stack = Stack(tmp_path / "run", dict(os.environ), cwd=tmp_path)
    stack.start([ServiceSpec("server", [sys.executable, "-c", SERVER, str(port)], port=port,
                             ready=lambda: _answers(url))])  # fmt: skip
    try:
        stack.refresh_children()
        record = stack.records[0]
        first_pid, worker = record.pid, int(next(iter(record.children)))
        os.kill(first_pid, signal.SIGKILL)  # the leader dies; its worker still holds the port
        until(lambda: not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == "zombie", 5, "death")

        now = time.time()
        assert stack.supervise(now) == [f"server (pid {first_pid}) exit status -9: restart in 1 s"]
        until(
            lambda: not psutil.pid_exists(worker) or psutil.Process(worker).status() == "zombie",
            10,
            "the leftover worker to be killed",
        )  # it held the port: the restart could not bind
        assert record.state == "restarting"
        assert stack.supervise(now + 0.5) == []  # not before its backoff
        assert stack.supervise(now + 1.0) == [f"server restarted (pid {record.pid}, restart 1)"]
        assert record.pid != first_pid
        recovered = until(lambda: _answers(url), 30, "the restarted server")

        os.kill(record.pid, signal.SIGKILL)  # dies again at once: the wait doubles
        until(lambda: record.state != "running", 5, "the second death")
        assert stack.supervise(time.time())[0].endswith("restart in 2 s")
        saved = Stack.load(tmp_path / "run", {}, cwd=tmp_path).records[0]
        assert (saved.restarts_total, saved.state) == (1, "restarting")  # what `recsys status` shows
        assert saved.last_exit.endswith("exit status -9")
    finally:
        stack.stop(grace=5)
    print(f"\nkilled with SIGKILL: answering again {1.0 + recovered:.1f} s after the death was seen")


def test_logs_are_rotated_and_private(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with log.open("ab") as writer:  # the writer keeps its descriptor across the rotation
        writer.write(b"x" * 2000)
        writer.flush()
        assert rotate_log(log, max_bytes=1000, backups=2)
        writer.write(b"after")
        writer.flush()
    assert (tmp_path / "server.log.1").read_bytes() == b"x" * 2000
    assert log.read_bytes() == b"after"  # appended from offset 0, no hole
    assert not rotate_log(log, max_bytes=1000, backups=2)
    assert oct((tmp_path / "server.log.1").stat().st_mode & 0o777) == "0o600"


def test_a_detached_stack_is_supervised_by_its_own_process_and_down_stops_all(tmp_path: Path) -> None:
    """`recsys up --detach`: a `recsys supervise` process restarts what dies; `recsys down` (here
    `Stack.stop`, what it calls) stops the supervisor first, then everything, restarted ones included."""
    from recsys_assets_tests.conftest import REPO_ROOT
    from recsys_cli.cli import SUPERVISE_ARGV
    from recsys_cli.stack.supervisor import SUPERVISOR
    from recsys_core.settings import load_settings

    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home")})
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    stack = Stack(settings.run_dir, settings.child_env(), cwd=REPO_ROOT)  # the supervisor runs this checkout's code
    stack.start([ServiceSpec("server", [sys.executable, "-c", SERVER, str(port)], port=port,
                             ready=lambda: _answers(url))])  # fmt: skip
    stack.start([ServiceSpec(SUPERVISOR, SUPERVISE_ARGV)], adding=True)
    try:
        first = stack.records[0].pid
        os.killpg(first, signal.SIGKILL)

        def restarted() -> bool:
            records = Stack.load(settings.run_dir, {}, cwd=REPO_ROOT).records
            return records[0].pid != first and _answers(url)

        until(restarted, 60, "the supervisor to restart the server")
        assert "server restarted" in (settings.run_dir / f"{SUPERVISOR}.log").read_text()
    finally:
        current = Stack.load(settings.run_dir, settings.child_env(), cwd=REPO_ROOT)
        stopped = current.stop(grace=5)
    assert stopped[0] == SUPERVISOR
    assert "server" in stopped
    assert not _answers(url)
    assert not (settings.run_dir / "stack.json").exists()
