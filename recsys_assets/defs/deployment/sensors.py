"""The canary sensor: while a challenger is in canary, the canary analysis runs as traffic comes in."""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation at
# definition time and rejects it as a string. Python 3.11 needs the import for nothing else.

import dagster as dg

from recsys_assets.automation import running_sensor
from recsys_assets.ml.canary import guardrail_breaches
from recsys_assets.ml.kpis import serving_health
from recsys_assets.resources import (
    CanaryPolicyResource,
    MLflowResource,
    PrometheusResource,
    ServingResource,
    WarehouseResource,
)
from recsys_assets.runs import ACTIVE
from recsys_core.registry import RegistryError
from recsys_core.warehouse import WarehouseError


def canary_look_key(version: int, step: int, challenger_impressions: int, per_look: int) -> str | None:
    """The run key of the canary analysis due now: one at the start, then one per ``per_look`` more
    challenger impressions in the current step (the mSPRT stays valid however often it looks)."""
    looks = challenger_impressions // per_look
    return f"canary:v{version}:s{step}:{looks}" if looks else None


def canary_sensor_fn(
    context: dg.SensorEvaluationContext,
    mlflow: MLflowResource,
    warehouse: WarehouseResource,
    prometheus: PrometheusResource,
    serving: ServingResource,
    canary_policy: CanaryPolicyResource,
):
    try:
        state = mlflow.get_registry().serving_state()
    except RegistryError as exc:
        return dg.SkipReason(f"the registry cannot be read: {exc}")
    if state.challenger is None or state.champion is None:
        return dg.SkipReason("no challenger in canary")
    canary_runs = dg.RunsFilter(tags={"recsys/trigger": "canary"}, statuses=ACTIVE)
    if active := context.instance.get_runs(filters=canary_runs, limit=1):
        return dg.SkipReason(f"the previous analysis of v{state.challenger} (run {active[0].run_id[:8]}) is not done")
    request = lambda key: dg.RunRequest(  # noqa: E731
        run_key=key, asset_selection=[dg.AssetKey("canary_analysis")], tags={"recsys/trigger": "canary"}
    )
    canary = state.canary
    if canary is None or canary.version != state.challenger:
        return request(f"canary:v{state.challenger}:start")
    rules = canary_policy.get_rules()
    versions = {"champion": state.champion, "challenger": state.challenger}
    since = canary.step_starts()[0][2]
    health, _ = serving_health(prometheus.url, serving.get_client().metrics, since, versions, canary.mode)
    if health and (breaches := guardrail_breaches(health["champion"], health["challenger"], rules)):
        context.log.warning(f"challenger v{state.challenger}: {'; '.join(breaches)}")
        return request(f"canary:v{state.challenger}:guardrail")
    step_start = canary.step_starts()[-1][2]
    try:
        impressions = warehouse.get_warehouse().scalar(
            "SELECT COUNT(*) FROM listening_events WHERE source = 'recommendation' AND event_type = 'impression' "
            "AND variant = 'challenger' AND model_version = ? AND played_at >= ?",
            [str(state.challenger), step_start],
        )
    except WarehouseError as exc:
        return dg.SkipReason(f"the online KPIs cannot be read: {exc}")
    key = canary_look_key(state.challenger, canary.step, int(impressions or 0), rules.min_impressions)
    if key is None:
        return dg.SkipReason(
            f"challenger v{state.challenger} at {canary.fraction:.0%} (step {canary.step}): "
            f"{int(impressions or 0):,} of {rules.min_impressions:,} impressions for the next look"
        )
    return request(key)


@dg.definitions
def sensors() -> dg.Definitions:
    canary_sensor = running_sensor(
        canary_sensor_fn,
        name="canary_sensor",
        asset_selection=["canary_analysis"],
        description="While a challenger is in canary: start it, analyse it each time enough new traffic has come "
        "in, and at once when a serving guardrail is breached.",
    )
    return dg.Definitions(sensors=[canary_sensor])
