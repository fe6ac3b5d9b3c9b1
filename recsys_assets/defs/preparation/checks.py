"""Asset checks of the clean events, per partition: the contract, nulls and duplicates, and conservation."""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation at
# definition time and rejects it as a string. Python 3.11 needs the import for nothing else.

import json

import dagster as dg
import polars as pl

from recsys_assets.constants import CLEAN_EVENTS_DATASET
from recsys_assets.data.cleaning import CLEAN_SCHEMA
from recsys_assets.defs.ingestion.partitions import ingest_batches
from recsys_assets.metadata import markdown_table
from recsys_assets.resources import PreparedDataResource, WarehouseResource


def schema_mismatches(actual: dict[str, pl.DataType], expected: dict[str, pl.DataType]) -> list[str]:
    """Human-readable differences between two schemas (missing, unexpected, wrong type)."""
    problems = [f"missing column {name} ({dtype})" for name, dtype in expected.items() if name not in actual]
    problems += [f"unexpected column {name}" for name in actual if name not in expected]
    problems += [
        f"{name}: {actual[name]} instead of {dtype}"
        for name, dtype in expected.items()
        if name in actual and actual[name] != dtype
    ]
    return problems


@dg.asset_check(
    asset="clean_listening_events",
    partitions_def=ingest_batches,
    description="Clean events follow the contract's schema (per partition).",
)
def clean_events_schema(context: dg.AssetCheckExecutionContext, prepared: PreparedDataResource) -> dg.AssetCheckResult:
    schema = dict(prepared.get_store().scan(CLEAN_EVENTS_DATASET, context.partition_keys).collect_schema())
    problems = schema_mismatches(schema, CLEAN_SCHEMA)
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"problems": dg.MetadataValue.json(problems), "columns": dg.MetadataValue.int(len(schema))},
    )


@dg.asset_check(
    asset="clean_listening_events",
    partitions_def=ingest_batches,
    description="No clean event has a null id, time or type, or a repeated event_id (per partition).",
)
def clean_events_nulls_and_duplicates(
    context: dg.AssetCheckExecutionContext, prepared: PreparedDataResource
) -> dg.AssetCheckResult:
    counts = (
        prepared.get_store()
        .scan(CLEAN_EVENTS_DATASET, context.partition_keys)
        .select(
            *[
                pl.col(c).null_count().alias(f"null_{c}")
                for c in ("event_id", "user_id", "track_id", "played_at", "event_type")
            ],
            (pl.len() - pl.col("event_id").n_unique()).alias("duplicate_event_ids"),
        )
        .collect(engine="streaming")
        .row(0, named=True)
    )
    return dg.AssetCheckResult(
        passed=all(v == 0 for v in counts.values()),
        metadata={k: dg.MetadataValue.int(int(v)) for k, v in counts.items()},
    )


def conservation_table(ingest_log: pl.DataFrame, clean_counts: pl.DataFrame, quarantine_counts: pl.DataFrame,
                       cleaning_duplicates: pl.DataFrame) -> pl.DataFrame:  # fmt: skip
    """Per batch: rows in, clean, quarantined, duplicates, and the gap (which must be 0).

    Args:
        ingest_log: ``batch_id``, ``rows_in``, ``duplicates`` (landing duplicates).
        clean_counts: ``batch_id``, ``clean``.
        quarantine_counts: ``batch_id``, ``quarantined`` (both stages).
        cleaning_duplicates: ``batch_id``, ``cleaning_duplicates``.
    """
    return (
        ingest_log.select("batch_id", "rows_in", pl.col("duplicates").alias("landing_duplicates"))
        .join(clean_counts, on="batch_id", how="left")
        .join(quarantine_counts, on="batch_id", how="left")
        .join(cleaning_duplicates, on="batch_id", how="left")
        .with_columns(pl.col("clean", "quarantined", "cleaning_duplicates").fill_null(0))
        .with_columns((pl.col("landing_duplicates") + pl.col("cleaning_duplicates")).alias("duplicates"))
        .with_columns((pl.col("rows_in") - pl.col("clean") - pl.col("quarantined") - pl.col("duplicates")).alias("gap"))
        .sort("batch_id")
    )


@dg.asset_check(
    asset="clean_listening_events",
    partitions_def=ingest_batches,
    blocking=True,
    description="For every batch of the partition: rows in = clean + quarantined + duplicates. Nothing is lost.",
)
def batch_conservation(
    context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource, prepared: PreparedDataResource
) -> dg.AssetCheckResult:
    store = prepared.get_store()
    clean_files = [store.batch_file(CLEAN_EVENTS_DATASET, key) for key in context.partition_keys]
    ranges = " OR ".join("batch_id BETWEEN ? AND ?" for _ in clean_files)
    bounds = [b for f in clean_files for b in (f.first, f.last)]
    wh = warehouse.get_warehouse()
    ingest_log = wh.fetch(f"SELECT batch_id, rows_in, duplicates FROM ingest_batches WHERE {ranges}", bounds)
    quarantine_counts = wh.fetch(
        f"SELECT batch_id, COUNT(*) AS quarantined FROM quarantine WHERE {ranges} GROUP BY batch_id", bounds
    ).cast({"quarantined": pl.Int64})
    clean_counts = (
        store.scan(CLEAN_EVENTS_DATASET, context.partition_keys)
        .group_by("batch_id")
        .agg(pl.len().cast(pl.Int64).alias("clean"))
        .collect()
    )
    dup_rows = []
    for f in clean_files:
        stats = json.loads(store.sidecar(CLEAN_EVENTS_DATASET, f).read_text())
        dup_rows += [(int(b), int(n)) for b, n in stats.get("duplicates_by_batch", {}).items()]
    cleaning_duplicates = pl.DataFrame(
        dup_rows, schema={"batch_id": pl.Int64, "cleaning_duplicates": pl.Int64}, orient="row"
    )
    table = conservation_table(
        ingest_log.cast({"rows_in": pl.Int64, "duplicates": pl.Int64}),
        clean_counts,
        quarantine_counts,
        cleaning_duplicates,
    )
    broken = table.filter(pl.col("gap") != 0)
    totals = table.select(pl.col("rows_in", "clean", "quarantined", "duplicates").sum()).row(0, named=True)
    return dg.AssetCheckResult(
        passed=broken.is_empty(),
        metadata={
            "partitions": dg.MetadataValue.text(", ".join(context.partition_keys)),
            "batches_checked": dg.MetadataValue.int(table.height),
            "batches_broken": dg.MetadataValue.int(broken.height),
            **{k: dg.MetadataValue.int(int(v or 0)) for k, v in totals.items()},
            "broken_batches": markdown_table(broken),
            "latest_batches": markdown_table(table.tail(10)),
        },
    )
