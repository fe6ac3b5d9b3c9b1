"""The local stack's run launcher: Dagster's ``DefaultRunLauncher`` plus the worker health check that
Dagster's run monitoring needs to see a run whose process died.

Under ``DefaultRunLauncher`` a run is a process that the code server starts on this machine, and
that launcher has no health check (``supports_check_run_worker_health`` is ``False``). So a run
worker that was killed (with the daemon whose process group it belongs to, by the OOM killer, by
``kill -9``) leaves its run ``STARTED`` for ever, and the retrain sensor waits on it for ever.

The run worker records its PID in the run's event log ("Started process for run (pid: N)"), which
is all a check needs on one machine. With this launcher, the daemon's run monitoring
(``run_monitoring`` in ``dagster.yaml``) marks such a run ``FAILURE`` at its next poll, with the
reason, and the sensors retry it as any crashed run. The Docker and Kubernetes launchers of
``deploy/`` have health checks of their own.
"""

from __future__ import annotations

import psutil
from dagster import DagsterEventType, DagsterRun, DefaultRunLauncher
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus

# The clocks of the event log and of /proc may differ by the rounding of either: a process started
# this much after the event that names it is still the one it names.
CLOCK_SLACK_SECONDS = 2.0


class LocalRunLauncher(DefaultRunLauncher):
    """``DefaultRunLauncher`` with a health check: is the run worker's process still alive?"""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        worker = self._worker(run.run_id)
        if worker is None:  # STARTED before the code server recorded the PID: look again next poll
            return CheckRunHealthResult(WorkerStatus.RUNNING, "the run worker's PID is not recorded yet")
        pid, recorded_at = worker
        try:
            process = psutil.Process(pid)
            alive = process.status() != psutil.STATUS_ZOMBIE
            # A PID reused by a later process is not the run worker.
            alive = alive and process.create_time() <= recorded_at + CLOCK_SLACK_SECONDS
        except psutil.NoSuchProcess:
            alive = False
        if alive:
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"run worker pid {pid} is alive")
        return CheckRunHealthResult(
            WorkerStatus.FAILED,
            f"the run worker (pid {pid}) is gone: killed or crashed without ending the run",
            run_worker_id=str(pid),
        )

    def _worker(self, run_id: str) -> tuple[int, float] | None:
        """The PID that the run's last "Started process for run" event names, and when it was recorded."""
        events = self._instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT)
        for entry in reversed(events):
            event = entry.dagster_event
            pid = event.engine_event_data.metadata.get("pid") if event and event.engine_event_data else None
            if pid is not None and entry.message.startswith("Started process for run"):
                return int(pid.value), entry.timestamp
        return None
