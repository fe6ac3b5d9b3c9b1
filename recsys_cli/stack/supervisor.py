"""Start, watch and stop the local stack's processes, by PID, leaving no orphans.

``dagster dev`` started from a script ignores SIGTERM and leaves its children behind, so the stack is
a set of plain processes: each one is started in a session of its own (its PID is its process
group), recorded with its start time in ``$RECSYS_HOME/run/stack.json``, and stopped by signalling
that group and then every descendant that was seen alive, by PID. A recorded PID whose start time no
longer matches belongs to somebody else and is left alone.

While the stack runs, :meth:`Stack.supervise` restarts a process that died, after 1, 2, 4 … 60 s
(reset once it has stayed up for a minute), and rotates the logs (copy then truncate, as logrotate's
``copytruncate``: the processes keep their append-mode file). ``recsys up`` runs it in the
foreground, or, with ``--detach``, in a ``recsys supervise`` process recorded with the stack.
(Hand-written rather than supervisord: supervisord backs off only on processes that die during
start-up, restarts one that ran for more than ``startsecs`` at once and for ever, and would bring a
daemon, a config file and a control socket of its own; the stack already owns start, readiness and
stopping by process group.)
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from recsys_core.net import free_port  # noqa: F401  (the stack's and the tests' import of it)

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"
SUPERVISOR = "supervisor"  # the record of the `recsys supervise` process of a detached stack
MAX_BACKOFF_SECONDS = 60.0
STABLE_SECONDS = 60.0  # up this long after a restart: the next death starts the backoff again
LOG_MAX_BYTES = 20 * 1024 * 1024
LOG_BACKUPS = 3


class StackError(RuntimeError):
    """The stack cannot start or stop as asked; the message says which process and why."""


@dataclass(frozen=True)
class ServiceSpec:
    """How to start one process of the stack and how to know that it answers.

    Args:
        name: short name, used in messages and as the log file's stem.
        argv: the command line.
        port: the TCP port it binds on ``host``; checked free before anything starts.
        url: what the user opens (printed), or ``None`` for a process with no UI.
        ready: a callable returning ``True`` once the process answers.
        env: variables added to the stack's environment for this process only.
    """

    name: str
    argv: Sequence[str]
    port: int | None = None
    url: str | None = None
    ready: Callable[[], bool] | None = field(default=None, compare=False, repr=False)
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class ProcessRecord:
    name: str
    pid: int
    create_time: float
    argv: list[str]
    log: str
    url: str | None
    # Descendants seen while the stack ran (code servers, web workers), stopped by PID too.
    children: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # the spec's own variables (for a restart)
    restarts: int = 0  # restarts in a row (reset once it stays up for STABLE_SECONDS)
    restarts_total: int = 0
    last_exit: str | None = None  # when and how it last died
    restart_at: float | None = None  # wall-clock time of the next restart (it is dead and waiting)

    @property
    def state(self) -> str:
        if _alive(self.pid, self.create_time) is not None:
            return "running"
        return "restarting" if self.restart_at is not None else "exited"


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port``.

    SO_REUSEADDR, as servers set it: a port left in TIME_WAIT by a process that just stopped is free.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def _alive(pid: int, create_time: float) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 0.05 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.NoSuchProcess:
        return None


class Stack:
    """The processes of one ``RECSYS_HOME``'s local stack.

    Args:
        run_dir: where the state file and the process logs go.
        env: the environment every process gets.
        cwd: the working directory of every process.
        host: the address every server binds.
    """

    def __init__(self, run_dir: Path, env: dict[str, str], cwd: Path, host: str = "127.0.0.1"):
        self.run_dir = run_dir
        self.env = env
        self.cwd = cwd
        self.host = host
        self.records: list[ProcessRecord] = []
        self._popen: dict[str, subprocess.Popen] = {}

    @property
    def state_file(self) -> Path:
        return self.run_dir / STATE_FILE

    # --- starting -----------------------------------------------------------------------------

    def check_free(self, specs: Iterable[ServiceSpec]) -> None:
        """Raise :class:`StackError` naming the first port that is taken."""
        if self.state_file.exists() and self.running_records():
            names = ", ".join(r.name for r in self.running_records())
            raise StackError(f"a stack is already running from {self.state_file} ({names}): run `recsys down` first")
        for spec in specs:
            if spec.port is not None and port_in_use(self.host, spec.port):
                raise StackError(
                    f"port {spec.port} on {self.host} is already in use, needed by {spec.name}: "
                    f"stop what holds it or choose another port "
                    f"(RECSYS_{spec.name.split('-')[0].upper()}_PORT or --{spec.name.split('-')[0]}-port)"
                )

    def start(self, specs: Sequence[ServiceSpec], timeout: float = 120.0, adding: bool = False) -> None:
        """Start every process, then wait until each one answers.

        On any failure the processes already started are stopped before the error is raised.

        Args:
            adding: these processes join this stack, already running (the supervisor).
        """
        if not adding:
            self.check_free(specs)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for spec in specs:
                self._spawn(spec)
            self._save()
            for spec in specs:
                self._wait_ready(spec, timeout)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, spec: ServiceSpec) -> None:
        log_path = self.run_dir / f"{spec.name}.log"
        proc = self._popen_logged(spec.name, list(spec.argv), dict(spec.env), log_path)
        self.records.append(
            ProcessRecord(
                name=spec.name,
                pid=proc.pid,
                create_time=psutil.Process(proc.pid).create_time(),
                argv=list(spec.argv),
                log=str(log_path),
                url=spec.url,
                env=dict(spec.env),
            )
        )
        log.info("started %s (pid %d), log in %s", spec.name, proc.pid, log_path)

    def _popen_logged(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # private, appended to
        try:
            proc = subprocess.Popen(
                argv,
                cwd=self.cwd,
                env={**self.env, **env},
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            os.close(fd)
        self._popen[name] = proc
        return proc

    # --- supervising ----------------------------------------------------------------------------

    def supervise(self, now: float | None = None) -> list[str]:
        """One round: schedule or do the restart of every dead process, and rotate the logs.

        Returns what it did, one line per action (for the supervisor's log and ``recsys status``).
        """
        now = time.time() if now is None else now
        done = []
        for record in self.records:
            if record.name == SUPERVISOR or _alive(record.pid, record.create_time) is not None:
                continue
            if record.restart_at is None:  # just found dead: its leftovers go, its restart is scheduled
                popen = self._popen.get(record.name)
                code = popen.poll() if popen is not None and popen.pid == record.pid else None
                _kill_leftovers(record)
                if now - record.create_time > STABLE_SECONDS:
                    record.restarts = 0
                delay = min(2.0**record.restarts, MAX_BACKOFF_SECONDS)
                record.last_exit = f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(now))} " + (
                    f"exit status {code}" if code is not None else "died"
                )
                record.restart_at = now + delay
                done.append(f"{record.name} (pid {record.pid}) {record.last_exit.split(' ', 1)[1]}: "
                            f"restart in {delay:.0f} s")  # fmt: skip
            elif now >= record.restart_at:
                proc = self._popen_logged(record.name, record.argv, record.env, Path(record.log))
                record.pid, record.create_time = proc.pid, psutil.Process(proc.pid).create_time()
                record.children = {}
                record.restarts += 1
                record.restarts_total += 1
                record.restart_at = None
                done.append(f"{record.name} restarted (pid {record.pid}, restart {record.restarts_total})")
        for record in self.records:
            if rotate_log(Path(record.log)):
                done.append(f"{record.name}: log rotated")
        if done:
            self._save()
            for line in done:
                log.warning("%s", line)
        return done

    def _wait_ready(self, spec: ServiceSpec, timeout: float) -> None:
        if spec.ready is None:
            return
        record = next(r for r in self.records if r.name == spec.name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _alive(record.pid, record.create_time) is None:
                raise StackError(f"{spec.name} exited during start-up; the end of {record.log}:\n{tail(record.log)}")
            if spec.ready():
                self.refresh_children()
                return
            time.sleep(0.5)
        raise StackError(
            f"{spec.name} did not answer within {timeout:.0f}s; the end of {record.log}:\n{tail(record.log)}"
        )

    # --- watching -----------------------------------------------------------------------------

    def refresh_children(self) -> None:
        """Record every live descendant, so that it can be stopped by PID later."""
        for record in self.records:
            proc = _alive(record.pid, record.create_time)
            if proc is None:
                continue
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    record.children[str(child.pid)] = child.create_time()
        self._save()

    def running_records(self) -> list[ProcessRecord]:
        return [r for r in self.records if _alive(r.pid, r.create_time) is not None]

    def exited(self) -> list[ProcessRecord]:
        """The processes of this stack that are no longer running."""
        return [r for r in self.records if _alive(r.pid, r.create_time) is None]

    def all_pids(self) -> set[int]:
        pids = {r.pid for r in self.records}
        for record in self.records:
            pids.update(int(pid) for pid in record.children)
        return pids

    # --- stopping -----------------------------------------------------------------------------

    def stop(self, grace: float = 15.0) -> list[str]:
        """Stop every process and descendant, newest first; return the names of those stopped.

        The supervisor (if any) goes first, and the state it last wrote is read again, so that a
        process it restarted meanwhile is stopped too."""
        stopped = []
        supervisor = next((r for r in self.records if r.name == SUPERVISOR), None)
        # The supervisor alone: the processes it restarted are its children, stopped by their records.
        if supervisor is not None and _stop_leader(supervisor, grace):
            stopped.append(SUPERVISOR)
            if self.state_file.exists():
                self.records = [ProcessRecord(**r) for r in json.loads(self.state_file.read_text())]
        self.records = [r for r in self.records if r.name != SUPERVISOR]
        self.refresh_children()
        for record in reversed(self.records):
            if _stop_record(record, grace):
                stopped.append(record.name)
        for popen in self._popen.values():
            with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
                popen.wait(timeout=1)
        self.records = []
        self.state_file.unlink(missing_ok=True)
        return stopped

    # --- state --------------------------------------------------------------------------------

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(r) for r in self.records], indent=2))
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, run_dir: Path, env: dict[str, str], cwd: Path, host: str = "127.0.0.1") -> Stack:
        """The stack recorded in ``run_dir`` (empty if none is)."""
        stack = cls(run_dir, env, cwd, host)
        if stack.state_file.exists():
            stack.records = [ProcessRecord(**r) for r in json.loads(stack.state_file.read_text())]
        return stack


def _stop_record(record: ProcessRecord, grace: float) -> bool:
    """SIGTERM the process group, wait, then SIGKILL whatever is left of it and its descendants."""
    leader = _alive(record.pid, record.create_time)
    members = [leader] if leader else []
    for pid, created in record.children.items():
        proc = _alive(int(pid), created)
        if proc is not None:
            members.append(proc)
    if leader is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            members.extend(c for c in leader.children(recursive=True) if c not in members)
    if not members:
        return False
    if leader is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pid, signal.SIGTERM)
    for proc in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, survivors = psutil.wait_procs(members, timeout=grace)
    for proc in survivors:
        log.warning("%s: pid %d did not stop on SIGTERM within %.0fs, killing it", record.name, proc.pid, grace)
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(survivors, timeout=5)
    return True


def _stop_leader(record: ProcessRecord, grace: float) -> bool:
    """SIGTERM one process (not its children), then SIGKILL it after ``grace``."""
    proc = _alive(record.pid, record.create_time)
    if proc is None:
        return False
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.terminate()
    _, survivors = psutil.wait_procs([proc], timeout=grace)
    for survivor in survivors:
        with contextlib.suppress(psutil.NoSuchProcess):
            survivor.kill()
    return True


def _kill_leftovers(record: ProcessRecord) -> None:
    """SIGKILL what is left of a dead leader's process group (workers that still hold its port).
    The group's id cannot be reused while a member lives, so this never reaches another process."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(record.pid, signal.SIGKILL)
    for pid, created in record.children.items():
        proc = _alive(int(pid), created)
        if proc is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def rotate_log(path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> bool:
    """Past ``max_bytes``: ``log`` → ``log.1`` → … → ``log.<backups>`` (copied, then truncated in
    place: the writer keeps its append-mode descriptor and goes on at offset 0)."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for n in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{n + 1}"))
    shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    os.chmod(path.with_name(f"{path.name}.1"), 0o600)
    os.truncate(path, 0)
    return True


def tail(path: str | Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
