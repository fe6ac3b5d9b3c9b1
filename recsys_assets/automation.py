"""Named, composed automation conditions: when each asset re-materializes by itself.

The automation sensor (``recsys_automation``, running by default) evaluates them. Retraining itself is
a job (``retrain``) that the triggers start: the new-data, drift and KPI sensors and the monthly
schedule (``sensors.py``, ``schedules.py``), so that one retrain is one run, end to end.
"""

from __future__ import annotations

import dagster as dg

# Inputs changed (new events extracted, features rebuilt): follow them, once nothing upstream is
# still running and the blocking checks of the inputs passed.
after_inputs_change = (
    dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
).with_label("after_inputs_change")

# Prepared data past its freshness policy's fail window: refresh it even without a new input.
stale = dg.AutomationCondition.freshness_failed().with_label("stale")

prepared_data = (after_inputs_change | (stale & ~dg.AutomationCondition.in_progress())).with_label("prepared_data")


def on_cadence(cron: str, label: str, partial: dg.AssetSelection | None = None) -> dg.AutomationCondition:
    """Every ``cron`` tick, once its inputs exist and unless a run of the asset is already in progress.

    ``partial``: partitioned inputs read as far as they are prepared. Without it, one partition landed
    and not yet cleaned counts as a missing input, and with a slower preparation (Spark, a queue of
    runs) there always is one: the report would never be due.
    """
    missing = dg.AutomationCondition.any_deps_missing()
    if partial is not None:
        missing = missing.ignore(partial)
    return (
        dg.AutomationCondition.cron_tick_passed(cron) & ~missing & ~dg.AutomationCondition.in_progress()
    ).with_label(label)


def sensor_interval_seconds() -> int:
    """How often the sensors look (``RECSYS_SENSOR_INTERVAL_SECONDS``). A definition-time value: only the
    ``@dg.definitions`` functions call this, when the definitions load, never at import."""
    from recsys_core.settings import load_settings

    return load_settings().automation.sensor_interval_seconds


def running_sensor(fn, *, name: str, description: str, **kwargs) -> dg.SensorDefinition:
    """The sensor ``name`` evaluating ``fn``, running by default, every ``RECSYS_SENSOR_INTERVAL_SECONDS``
    (so call it from a ``@dg.definitions`` function). ``kwargs`` go to ``dg.sensor`` (a target)."""
    return dg.sensor(
        name=name,
        minimum_interval_seconds=sensor_interval_seconds(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=description,
        **kwargs,
    )(fn)
