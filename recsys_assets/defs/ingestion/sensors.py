"""The warehouse sensor: newly landed batches become a partition of the raw events, and its run."""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation at
# definition time and rejects it as a string. Python 3.11 needs the import for nothing else.

import json
from datetime import UTC, datetime

import dagster as dg

from recsys_assets.automation import running_sensor
from recsys_assets.data.store import parse_batch_range_key
from recsys_assets.defs.ingestion.partitions import ingest_batches, new_batch_ranges, partitioned_up_to
from recsys_assets.resources import RetrainPolicyResource, WarehouseResource
from recsys_assets.runs import ACTIVE
from recsys_core.warehouse import WarehouseError

EXTRACTION_TRIGGER = "new-batches"
PARTITION_TAG = "dagster/partition"


def failed_extractions(instance: dg.DagsterInstance) -> list[str]:
    """The partitions whose last extraction failed (a warehouse outage during the run, say)."""
    keys = instance.get_dynamic_partitions(ingest_batches.name)
    statuses = instance.get_status_by_partition(dg.AssetKey("listening_events"), keys, ingest_batches) or {}
    return sorted(k for k, status in statuses.items() if status == dg.AssetPartitionStatus.FAILED)


# A partition that keeps failing is asked again later each time: at once after its first failure (an
# outage that is over), then after 1, 2, 4 … 64 extraction intervals since its last failure.
MAX_RETRY_BACKOFF = 64


def retry_wait(instance: dg.DagsterInstance, key: str, interval: float, now: datetime) -> float:
    """Seconds before the failed partition ``key`` may be extracted again (0: now)."""
    failed = instance.get_run_records(
        filters=dg.RunsFilter(tags={PARTITION_TAG: key}, statuses=[dg.DagsterRunStatus.FAILURE])
    )
    if len(failed) < 2:
        return 0.0
    last = max(r.end_time or r.create_timestamp.timestamp() for r in failed)
    backoff = interval * min(2 ** (len(failed) - 2), MAX_RETRY_BACKOFF)
    return max(0.0, last + backoff - now.timestamp())


def warehouse_sensor_fn(
    context: dg.SensorEvaluationContext, warehouse: WarehouseResource, retrain_policy: RetrainPolicyResource
):
    seen = partitioned_up_to(context.instance)
    try:
        new_keys = new_batch_ranges(warehouse.get_warehouse(), seen)
    except WarehouseError as exc:
        return dg.SkipReason(f"the warehouse cannot be read: {exc}")
    # A failed extraction is asked again (its run_key is new) once the warehouse answers, at the pace of
    # new ones and after its backoff: the failure is the run's, with its reason; the retry is the next
    # trigger's.
    now = datetime.now(UTC)
    interval = retrain_policy.extract_min_interval_seconds
    failed = failed_extractions(context.instance)
    waits = {key: retry_wait(context.instance, key, interval, now) for key in failed}
    retries = [key for key in failed if waits[key] <= 0]
    if not new_keys and not retries:
        if failed:
            soonest = min(failed, key=waits.get)
            return dg.SkipReason(f"no new batch since batch {seen}; {len(failed)} failed extraction(s) back off: "
                                 f"{soonest} is retried in {waits[soonest]:.0f}s")  # fmt: skip
        return dg.SkipReason(f"no new batch since batch {seen}")
    pending = [f"batches {seen + 1}..{parse_batch_range_key(new_keys[-1])[1]}"] if new_keys else []
    pending += [f"{len(retries)} failed extraction(s)"] if retries else []
    waiting = " and ".join(pending) + " wait"
    active = context.instance.get_runs(
        filters=dg.RunsFilter(tags={"recsys/trigger": EXTRACTION_TRIGGER}, statuses=ACTIVE), limit=1
    )
    if active:
        return dg.SkipReason(f"{waiting}: the previous extraction (run {active[0].run_id[:8]}) is not done")
    last_request = json.loads(context.cursor).get("requested_at") if context.cursor else None
    if last_request and (now - datetime.fromisoformat(last_request)).total_seconds() < interval:
        return dg.SkipReason(f"{waiting}: at most one new partition every {interval}s")
    context.update_cursor(json.dumps({"requested_at": now.isoformat()}))
    requests = [
        dg.RunRequest(
            run_key=key if key in new_keys else f"{key}:retry:{now.isoformat()}",
            partition_key=key,
            asset_selection=[dg.AssetKey("listening_events")],
            tags={"recsys/trigger": EXTRACTION_TRIGGER, **({"recsys/retry": "true"} if key in retries else {})},
        )
        for key in [*retries, *new_keys]
    ]
    adds = [ingest_batches.build_add_request(new_keys)] if new_keys else []
    return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=adds)


@dg.definitions
def sensors() -> dg.Definitions:
    warehouse_sensor = running_sensor(
        warehouse_sensor_fn,
        name="warehouse_sensor",
        asset_selection=["listening_events"],
        description="New batches landed in the warehouse: add their partition and extract it.",
    )
    return dg.Definitions(sensors=[warehouse_sensor])
