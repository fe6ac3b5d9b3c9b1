"""Ingestion: the warehouse tables, and the raw events extracted from them, one partition per batch range."""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation at
# definition time and rejects it as a string. Python 3.11 needs the import for nothing else.

import dagster as dg
import polars as pl

from recsys_assets.constants import INGESTION, RAW_EVENTS_DATASET, RAW_FRESHNESS
from recsys_assets.data.store import parse_batch_range_key
from recsys_assets.defs.ingestion.partitions import ingest_batches
from recsys_assets.metadata import markdown_table, time_range
from recsys_assets.resources import PreparedDataResource, WarehouseResource

# The warehouse tables are written outside Dagster (simulator, importers, serving feedback): they are
# external assets, so that the lineage starts where the data does.
warehouse_listening_events = dg.AssetSpec(
    key=["warehouse", "listening_events"],
    group_name=INGESTION,
    kinds={"sql"},
    description="Listening events landed in the warehouse (append-only, one ingest batch at a time).",
)
warehouse_catalog = dg.AssetSpec(
    key=["warehouse", "catalog"],
    group_name=INGESTION,
    kinds={"sql"},
    description="The catalogue tables of the warehouse: tracks and users.",
)


@dg.asset(
    group_name=INGESTION,
    deps=[warehouse_listening_events],
    partitions_def=ingest_batches,
    # A backfill of many ranges (a changed rule, a lost bucket) is one run, not one per range.
    backfill_policy=dg.BackfillPolicy.single_run(),
    kinds={"polars", "parquet"},
    tags={"recsys/stage": "ingestion"},
    freshness_policy=RAW_FRESHNESS,
)
def listening_events(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, prepared: PreparedDataResource
) -> dg.MaterializeResult:
    """Raw listening events, one Parquet file per partition (a range of batches landed in the warehouse).

    The warehouse sensor adds a partition for each range of newly landed batches; materializing a
    partition copies exactly those batches, checked against the ingest log's row counts.
    """
    store = prepared.get_store()
    wh = warehouse.get_warehouse()
    wh.init_schema()
    extracted = 0
    frame = pl.DataFrame()
    for key in context.partition_keys:
        first, last = parse_batch_range_key(key)
        expected = int(
            wh.scalar(
                "SELECT COALESCE(SUM(landed), 0) FROM ingest_batches WHERE batch_id BETWEEN ? AND ?", [first, last]
            )
        )
        frame = wh.events_between(first, last)
        if frame.height != expected:
            raise RuntimeError(
                f"partition {key}: the ingest log says {expected} rows landed, the warehouse returned "
                f"{frame.height}; nothing was written"
            )
        store.write_batch_file(RAW_EVENTS_DATASET, first, last, frame)
        extracted += frame.height
        context.log.info(f"extracted {key}: {frame.height:,} rows")
    metadata: dict[str, object] = {
        "dagster/row_count": dg.MetadataValue.int(extracted),
        "partitions": dg.MetadataValue.int(len(context.partition_keys)),
        "path": dg.MetadataValue.path(str(store.dataset_dir(RAW_EVENTS_DATASET))),
    }
    if frame.height:
        metadata.update(time_range(frame))
        metadata["preview"] = markdown_table(frame.drop("ingested_at"))
    return dg.MaterializeResult(metadata=metadata)
