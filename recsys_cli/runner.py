"""Run the asset graph, or a selection of it, in this process against ``$DAGSTER_HOME``'s instance."""

from __future__ import annotations

import dagster as dg

from recsys_assets.defs.ingestion.partitions import ingest_batches, new_batch_ranges, partitioned_up_to
from recsys_core.settings import load_settings
from recsys_core.warehouse import Warehouse


def add_landed_partitions(instance: dg.DagsterInstance, warehouse: Warehouse) -> list[str]:
    """Add the partitions of the batches landed since the last one (what the warehouse sensor does)."""
    keys = new_batch_ranges(warehouse, partitioned_up_to(instance))
    if keys:
        instance.add_dynamic_partitions(ingest_batches.name, keys)
    return keys


def materialize_selection(selection: str = "*", *, raise_on_error: bool = False) -> list[dg.ExecuteInProcessResult]:
    """Materialize ``selection`` (Dagster's asset selection syntax) and its checks.

    Partitioned assets are materialized for every partition that they lack (the landed batches'
    partitions are added first), one run per partition; then the rest in one run. The runs are
    recorded in the instance of ``$DAGSTER_HOME``, so they show in the UI like any other.
    """
    from recsys_assets.definitions import defs as load_defs

    defs = load_defs()
    asset_graph = defs.resolve_asset_graph()
    try:
        keys = dg.AssetSelection.from_string(selection).resolve(asset_graph, allow_missing=True)
    except dg.DagsterError as exc:  # the selection does not parse
        raise ValueError(f"the selection {selection!r} is not valid: {exc}") from exc
    materializable = sorted(k for k in keys if asset_graph.get(k).is_materializable)
    if not materializable:
        raise ValueError(f"the selection {selection!r} matches no materializable asset")
    partitioned = [k for k in materializable if asset_graph.get(k).partitions_def is not None]
    rest = [k for k in materializable if k not in partitioned]
    job = defs.resolve_implicit_global_asset_job_def()
    results = []
    tags = {"recsys/trigger": "cli"}
    with dg.DagsterInstance.get() as instance:
        if partitioned:
            add_landed_partitions(instance, Warehouse(load_settings().warehouse_uri))
            for key in instance.get_dynamic_partitions(ingest_batches.name):
                if all(
                    (instance.get_status_by_partition(asset, [key], ingest_batches) or {}).get(key)
                    == dg.AssetPartitionStatus.MATERIALIZED
                    for asset in partitioned
                ):
                    continue
                results.append(
                    job.execute_in_process(
                        instance=instance, asset_selection=partitioned, partition_key=key,
                        raise_on_error=raise_on_error, tags=tags,
                    )
                )  # fmt: skip
        if rest:
            results.append(
                job.execute_in_process(
                    instance=instance, asset_selection=rest, raise_on_error=raise_on_error, tags=tags
                )
            )
    return results
