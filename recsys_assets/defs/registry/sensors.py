"""The registry audit: alias moves the platform did not make (the MLflow UI, a script) are recorded.

An alias that points elsewhere than the control plane last moved it is recorded in the version's
history, ``by: unknown``, and logged.
"""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation at
# definition time and rejects it as a string. Python 3.11 needs the import for nothing else.

import dagster as dg

from recsys_assets.automation import running_sensor
from recsys_assets.resources import MLflowResource
from recsys_core.registry import RegistryError


def registry_audit_fn(context: dg.SensorEvaluationContext, mlflow: MLflowResource):
    try:
        foreign = mlflow.get_control_plane().audit_aliases()
    except RegistryError as exc:
        return dg.SkipReason(f"the registry cannot be read: {exc}")
    for event in foreign:
        context.log.warning(f"{event['action']}: v{event['from']} -> v{event['to']} (recorded in its history)")
    if not foreign:
        return dg.SkipReason("every alias is where the control plane last moved it")
    return dg.SkipReason("recorded " + "; ".join(f"{e['action']} (v{e['from']} -> v{e['to']})" for e in foreign))


@dg.definitions
def sensors() -> dg.Definitions:
    audit = running_sensor(
        registry_audit_fn,
        name="registry_audit_sensor",
        description="Detect and record alias moves that the platform did not make (the MLflow UI, a script).",
    )
    return dg.Definitions(sensors=[audit])
