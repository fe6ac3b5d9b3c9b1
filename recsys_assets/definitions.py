"""The code location: the one place where ``dg.Definitions`` is built."""

from __future__ import annotations

import dagster as dg

import recsys_assets  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from recsys_assets import checks, schedules, sensors
from recsys_assets.assets import (
    deployment,
    evaluation,
    features,
    ingestion,
    monitoring,
    preparation,
    registry,
    training,
)
from recsys_assets.jobs import retrain_job
from recsys_assets.resources import build_resources
from recsys_core.settings import load_settings

defs = dg.Definitions(
    assets=[
        ingestion.warehouse_listening_events,
        ingestion.warehouse_catalog,
        *dg.load_assets_from_modules(
            [ingestion, preparation, features, training, evaluation, registry, deployment, monitoring]
        ),
    ],
    asset_checks=dg.load_asset_checks_from_modules([checks, evaluation]),
    jobs=[retrain_job],
    # One process per run: a run's steps share the imports (TensorFlow alone costs seconds per process).
    executor=dg.in_process_executor,
    schedules=[schedules.monthly_retrain],
    sensors=[
        sensors.warehouse_sensor,
        sensors.new_data_sensor,
        sensors.drift_sensor,
        sensors.kpi_alert_sensor,
        sensors.canary_sensor,
        sensors.abandoned_training_sensor,
        sensors.registry_audit_sensor,
        sensors.automation_sensor,
    ],
    resources=build_resources(load_settings()),
)
