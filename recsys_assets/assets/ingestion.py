"""Ingestion: the warehouse tables, and the raw events extracted from them incrementally."""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation at
# definition time and rejects it as a string. Python 3.11 needs the import for nothing else.

import dagster as dg
import polars as pl

from recsys_assets import automation
from recsys_assets.constants import EXTRACT_ROWS_PER_FILE, INGESTION, RAW_EVENTS_DATASET, RAW_FRESHNESS
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


def plan_extraction(batches: pl.DataFrame, rows_per_file: int) -> list[tuple[int, int, int]]:
    """Group consecutive landed batches into files of about ``rows_per_file`` rows.

    Args:
        batches: the ingest log (``batch_id``, ``landed``) of the batches to extract, in order.
        rows_per_file: target rows per file; a batch larger than that gets a file of its own.

    Returns:
        ``(first_batch, last_batch, rows)`` per file.
    """
    plan: list[tuple[int, int, int]] = []
    first = last = None
    rows = 0
    for batch_id, landed in batches.select("batch_id", "landed").iter_rows():
        if first is not None and rows + landed > rows_per_file:
            plan.append((first, last, rows))
            first, rows = None, 0
        first = batch_id if first is None else first
        last = batch_id
        rows += landed
    if first is not None:
        plan.append((first, last, rows))
    return plan


@dg.asset(
    group_name=INGESTION,
    deps=[warehouse_listening_events],
    kinds={"polars", "parquet"},
    tags={"recsys/stage": "ingestion"},
    freshness_policy=RAW_FRESHNESS,
    automation_condition=automation.stale & ~dg.AutomationCondition.in_progress(),
)
def listening_events(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, prepared: PreparedDataResource
) -> dg.MaterializeResult:
    """Raw listening events, extracted incrementally from the warehouse into Parquet.

    Each materialization extracts only the batches landed since the last one (the highest batch on
    disk is the cursor), so it costs in proportion to the new rows; the same batch is never written
    twice.
    """
    store = prepared.get_store()
    wh = warehouse.get_warehouse()
    wh.init_schema()
    cursor = store.last_batch(RAW_EVENTS_DATASET)
    new_batches = wh.batches_after(cursor).filter(pl.col("landed") > 0)
    plan = plan_extraction(new_batches, EXTRACT_ROWS_PER_FILE)
    context.log.info(f"cursor at batch {cursor}: {new_batches.height} new batches to extract in {len(plan)} files")
    extracted = 0
    last_frame = pl.DataFrame()
    for first, last, expected in plan:
        frame = wh.events_between(first, last)
        if frame.height != expected:
            raise RuntimeError(
                f"batches {first}..{last}: the ingest log says {expected} rows landed, the warehouse returned "
                f"{frame.height}; nothing was written"
            )
        store.write_batch_file(RAW_EVENTS_DATASET, first, last, frame)
        extracted += frame.height
        last_frame = frame
        context.log.info(f"extracted batches {first}..{last}: {frame.height:,} rows")
    files = store.batch_files(RAW_EVENTS_DATASET)
    total = store.scan(RAW_EVENTS_DATASET).select(pl.len()).collect().item() if files else 0
    metadata: dict[str, object] = {
        "new_rows": dg.MetadataValue.int(extracted),
        "new_batches": dg.MetadataValue.int(new_batches.height),
        "dagster/row_count": dg.MetadataValue.int(total),
        "files": dg.MetadataValue.int(len(files)),
        "last_batch": dg.MetadataValue.int(store.last_batch(RAW_EVENTS_DATASET)),
        "path": dg.MetadataValue.path(str(store.dataset_dir(RAW_EVENTS_DATASET))),
    }
    if extracted:
        metadata.update(time_range(last_frame))
        metadata["preview"] = markdown_table(last_frame.drop("ingested_at"))
    return dg.MaterializeResult(metadata=metadata)
