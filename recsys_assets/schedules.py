"""Schedules: the monthly retrain (``RECSYS_RETRAIN_CRON``, default 03:00 on the 1st, UTC)."""

from __future__ import annotations

import dagster as dg

from recsys_assets.constants import RETRAIN_TAG
from recsys_assets.jobs import retrain_job
from recsys_core.settings import load_settings

monthly_retrain = dg.ScheduleDefinition(
    name="monthly_retrain",
    job=retrain_job,
    cron_schedule=load_settings().automation.retrain_cron,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    tags={RETRAIN_TAG: "true", "recsys/trigger": "monthly"},
    description="Retrain every month whatever the data says.",
)
