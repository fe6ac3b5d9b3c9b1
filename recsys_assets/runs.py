"""Questions about Dagster runs that several sensors and assets ask (the instance's public API only)."""

from __future__ import annotations

import dagster as dg

from recsys_assets.constants import RETRAIN_TAG

RUN_KEY_TAG = "dagster/run_key"
ACTIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def running_retrain(instance: dg.DagsterInstance) -> dg.DagsterRun | None:
    """The retrain run queued or running, if any."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={RETRAIN_TAG: "true"}, statuses=ACTIVE), limit=1)
    return runs[0] if runs else None


def run_with_key(instance: dg.DagsterInstance, run_key: str) -> dg.DagsterRun | None:
    """The run a sensor requested with ``run_key``, if the daemon launched it."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={RUN_KEY_TAG: run_key}), limit=1)
    return runs[0] if runs else None


def dagster_run_active(instance: dg.DagsterInstance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    return run is not None and not run.is_finished
