"""A run whose process died is failed by Dagster's own run monitoring, through the stack's launcher."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import dagster as dg
from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData
from dagster._core.events.log import EventLogEntry
from dagster._daemon.monitoring.run_monitoring import monitor_started_run

from recsys_cli.stack.run_launcher import LocalRunLauncher

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def _started_run(instance: dg.DagsterInstance) -> dg.DagsterRun:
    return instance.add_run(dg.DagsterRun(job_name="retrain", status=dg.DagsterRunStatus.STARTED))


def _record_worker(instance: dg.DagsterInstance, run: dg.DagsterRun, pid: int, at: float | None = None) -> None:
    """The event the code server writes when it starts a run's process ("Started process for run")."""
    message = f"Started process for run (pid: {pid})."
    event = DagsterEvent(
        event_type_value=DagsterEventType.ENGINE_EVENT.value,
        job_name=run.job_name,
        message=message,
        event_specific_data=EngineEventData.in_process(pid),
    )
    instance.handle_new_event(
        EventLogEntry(
            error_info=None,
            level=logging.INFO,
            user_message=message,
            run_id=run.run_id,
            timestamp=time.time() if at is None else at,
            dagster_event=event,
            job_name=run.job_name,
        )
    )


def _monitor(instance: dg.DagsterInstance, run: dg.DagsterRun) -> dg.DagsterRun:
    """One pass of the daemon's run monitoring over ``run``; the run as it is after it."""
    record = instance.get_run_record_by_id(run.run_id)
    monitor_started_run(instance, None, record, logging.getLogger("run-monitoring"))  # type: ignore[arg-type]
    return instance.get_run_by_id(run.run_id)


def test_the_stacks_dagster_yaml_fails_a_run_whose_worker_was_killed(recsys_env) -> None:
    # The instance `recsys` writes for a new RECSYS_HOME, as the daemon loads it.
    instance = dg.DagsterInstance.from_config(str(recsys_env.dagster_home))
    assert isinstance(instance.run_launcher, LocalRunLauncher)
    assert instance.run_monitoring_enabled

    run = _started_run(instance)
    assert _monitor(instance, run).status == dg.DagsterRunStatus.STARTED  # no PID recorded yet: not judged

    worker = subprocess.Popen(SLEEPER)
    try:
        _record_worker(instance, run, worker.pid)
        assert _monitor(instance, run).status == dg.DagsterRunStatus.STARTED
    finally:
        worker.kill()
        worker.wait(timeout=10)

    failed = _monitor(instance, run)
    assert failed.status == dg.DagsterRunStatus.FAILURE
    failure = instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_FAILURE)[-1]
    assert f"the run worker (pid {worker.pid}) is gone" in failure.message


def test_a_pid_reused_by_a_later_process_is_not_the_run_worker(recsys_env) -> None:
    instance = dg.DagsterInstance.from_config(str(recsys_env.dagster_home))
    run = _started_run(instance)
    later = subprocess.Popen(SLEEPER)  # alive, but started an hour after the event that names its PID
    try:
        _record_worker(instance, run, later.pid, at=time.time() - 3600)
        health = instance.run_launcher.check_run_worker_health(run)
        assert health.status.value == "FAILED", health
        assert _monitor(instance, run).status == dg.DagsterRunStatus.FAILURE
    finally:
        later.kill()
        later.wait(timeout=10)
