"""The supervisor starts processes, reports failures with their logs, and leaves no orphans."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import psutil
import pytest

from recsys_cli.stack.supervisor import ServiceSpec, Stack, StackError, free_port, port_in_use

# A parent that starts a grandchild in the same session, then both sleep: the shape of
# dagster-webserver and its code server.
PARENT_WITH_CHILD = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
    "time.sleep(600)"
)


def _stack(tmp_path: Path) -> Stack:
    return Stack(tmp_path / "run", env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)


def test_a_taken_port_is_named_in_the_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        spec = ServiceSpec(name="dagster-webserver", argv=["true"], port=port)
        with pytest.raises(
            StackError, match=f"port {port} on 127.0.0.1 is already in use, needed by dagster-webserver"
        ):
            _stack(tmp_path).start([spec])
    assert not port_in_use("127.0.0.1", port)


def test_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    stack.start([ServiceSpec(name="parent", argv=[sys.executable, "-c", PARENT_WITH_CHILD])])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not psutil.Process(stack.records[0].pid).children():
        time.sleep(0.1)
    stack.refresh_children()
    pids = stack.all_pids()
    assert len(pids) == 2
    assert stack.state_file.exists()

    stopped = stack.stop(grace=5)

    assert stopped == ["parent"]
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    assert not stack.state_file.exists()


def test_down_from_another_process_reads_the_state_file(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    stack.start([ServiceSpec(name="sleeper", argv=[sys.executable, "-c", "import time; time.sleep(600)"])])
    pid = stack.records[0].pid

    other = Stack.load(tmp_path / "run", env={}, cwd=tmp_path)
    assert [r.pid for r in other.running_records()] == [pid]
    assert other.stop(grace=5) == ["sleeper"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_process_that_dies_at_start_up_is_reported_with_its_log(tmp_path: Path) -> None:
    crash = ServiceSpec(
        name="crasher",
        argv=[sys.executable, "-c", "import sys; print('no config found'); sys.exit(3)"],
        ready=lambda: False,
    )
    stack = _stack(tmp_path)
    with pytest.raises(StackError, match="crasher exited during start-up") as err:
        stack.start([crash], timeout=20)
    assert "no config found" in str(err.value)
    assert stack.records == []


def test_a_process_that_never_answers_times_out_and_is_stopped(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    silent = ServiceSpec(
        name="silent", argv=[sys.executable, "-c", "import time; time.sleep(600)"], ready=lambda: False
    )
    with pytest.raises(StackError, match="silent did not answer within 1s"):
        stack.start([silent], timeout=1)
    assert stack.records == []


def test_a_second_stack_in_the_same_home_is_refused(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    stack.start([ServiceSpec(name="first", argv=[sys.executable, "-c", "import time; time.sleep(600)"])])
    try:
        with pytest.raises(StackError, match="a stack is already running"):
            Stack.load(tmp_path / "run", env={}, cwd=tmp_path).start(
                [ServiceSpec(name="second", argv=["true"], port=free_port())]
            )
    finally:
        stack.stop(grace=5)
