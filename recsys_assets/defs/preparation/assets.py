"""Preparation: clean, normalised listening events, with the rejected rows in quarantine."""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation at
# definition time and rejects it as a string. Python 3.11 needs the import for nothing else.

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import dagster as dg
import polars as pl
from pydantic import Field

from recsys_assets import automation
from recsys_assets.constants import CLEAN_EVENTS_DATASET, PREPARATION, PREPARATION_POD, RAW_EVENTS_DATASET
from recsys_assets.data.cleaning import CLEAN_SCHEMA, CleaningRules, clean_events
from recsys_assets.data.store import (
    move_file,
    parquet_parts,
    read_parquet,
    remove_tree,
    scan_parquet,
    spark_uri,
    write_json_atomic,
    write_parquet_atomic,
)
from recsys_assets.defs.ingestion.partitions import ingest_batches
from recsys_assets.metadata import counts_table, markdown_table, reason_category, time_range
from recsys_assets.resources import PreparationEngineResource, PreparedDataResource, WarehouseResource
from recsys_core.contracts import QUARANTINE_SCHEMA, TRACKS_SCHEMA, USERS_SCHEMA, conform, empty_frame

# The column of a Spark job's output that names the partition (data.spark_prep.GROUP; that module
# imports PySpark, which the polars engine does not need).
GROUP = "_partition"
COUNTS = ("rows_in", "clean", "quarantined", "duplicates")
# The asset check each engine reports (spark_jobs.prepare.CONSERVATION_CHECK).
ENGINE_CONSERVATION = "engine_conservation"


class CleaningConfig(dg.Config):
    """Thresholds of the cleaning rules."""

    max_ms_played: int = Field(
        default=CleaningRules.max_ms_played,
        description="Plays longer than this (ms) are absurd and quarantined.",
    )
    future_tolerance_minutes: int = Field(
        default=10, description="How far in the future a played_at may be before it is quarantined."
    )
    earliest: str = Field(
        default="2000-01-01",
        description="Events before this date (ISO) are implausible and quarantined; MovieLens needs 1995-01-01.",
    )
    bot_plays_per_hour: int = Field(
        default=CleaningRules.bot_plays_per_hour,
        description="Users with more plays or skips in one hour are flagged suspected bots.",
    )

    def rules(self) -> CleaningRules:
        return CleaningRules(
            max_ms_played=self.max_ms_played,
            future_tolerance=timedelta(minutes=self.future_tolerance_minutes),
            bot_plays_per_hour=self.bot_plays_per_hour,
            earliest=datetime.fromisoformat(self.earliest).replace(tzinfo=UTC),
        )


@dg.asset(
    group_name=PREPARATION,
    deps=["listening_events"],
    partitions_def=ingest_batches,
    # A changed rule is applied to history by a backfill: one run (one Spark application with the
    # spark engine) for all the ranges it re-cleans.
    backfill_policy=dg.BackfillPolicy.single_run(),
    kinds={"polars", "spark", "parquet"},
    op_tags=PREPARATION_POD,
    tags={"recsys/stage": "preparation"},
    automation_condition=automation.after_inputs_change,
    check_specs=[
        dg.AssetCheckSpec(
            ENGINE_CONSERVATION,
            asset="clean_listening_events",
            blocking=True,
            description="The engine's own count, for every batch it read: rows in = clean + quarantined + "
            "duplicates (computed in the run's process by polars, or by the Spark job and reported through Pipes).",
        )
    ],
)
def clean_listening_events(
    context: dg.AssetExecutionContext,
    config: CleaningConfig,
    warehouse: WarehouseResource,
    prepared: PreparedDataResource,
    preparation: PreparationEngineResource,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """Clean listening events: de-duplicated, typed, in UTC, clipped, enriched and flagged, per partition.

    Each partition's raw file is cleaned on its own and its clean file replaced, so a backfill
    re-cleans exactly the partitions it names; rows that break the contract go to the warehouse's
    quarantine table with their reason (the partition's earlier quarantine is replaced). The engine
    is polars in this process, or Spark through Dagster Pipes (``RECSYS_PREP_ENGINE``): the same rules,
    files, quarantine and metadata.
    """
    store = prepared.get_store()
    wh = warehouse.get_warehouse()
    tracks = wh.table("tracks", TRACKS_SCHEMA)
    users = wh.table("users", USERS_SCHEMA)
    now = datetime.now(UTC)
    rules = config.rules()
    keys = list(context.partition_keys)
    if preparation.on_spark:
        per_partition, reasons, engine, checks = _clean_on_spark(context, preparation, store, tracks, users, now, rules)
    else:
        per_partition, reasons, engine = _clean_on_polars(context, store, tracks, users, now, rules)
        checks = [engine_conservation(per_partition)]
    totals = dict.fromkeys(COUNTS, 0)
    for key in keys:
        stats, quarantined = per_partition[key]
        raw_file = store.batch_file(RAW_EVENTS_DATASET, key)
        wh.replace_quarantine("cleaning", stats.pop("batch_ids"), quarantined)
        write_json_atomic(stats, store.sidecar(CLEAN_EVENTS_DATASET, raw_file))
        for k in totals:
            totals[k] += stats[k]
        context.log.info(f"cleaned {key}: {stats}")

    metadata: dict[str, object] = {
        "dagster/row_count": dg.MetadataValue.int(totals["clean"]),
        "rows_in": dg.MetadataValue.int(totals["rows_in"]),
        "quarantined": dg.MetadataValue.int(totals["quarantined"]),
        "duplicates": dg.MetadataValue.int(totals["duplicates"]),
        "partitions": dg.MetadataValue.int(len(keys)),
        "quarantined_by_reason": counts_table(reasons),
        "rules": dg.MetadataValue.json(config.model_dump()),
        "path": dg.MetadataValue.path(str(store.dataset_dir(CLEAN_EVENTS_DATASET))),
        **engine,
    }
    # A profile of the last partition, read back from its file (whichever engine wrote it).
    last_clean = store.scan(CLEAN_EVENTS_DATASET, keys[-1:]).collect()
    if last_clean.height:
        metadata["users"] = dg.MetadataValue.int(last_clean["user_id"].n_unique())
        metadata["suspected_bot_rows"] = dg.MetadataValue.int(int(last_clean["suspected_bot"].sum()))
        metadata["unknown_track_rows"] = dg.MetadataValue.int(int((~last_clean["known_track"]).sum()))
        metadata.update(time_range(last_clean))
        metadata["preview"] = markdown_table(last_clean.drop("ingested_at"))
    yield dg.MaterializeResult(metadata=metadata)
    yield from checks


def engine_conservation(per_partition: dict[str, "PartitionOutcome"]) -> dg.AssetCheckResult:
    """The polars engine's own conservation count, as the Spark job reports its own."""
    stats = [s for s, _ in per_partition.values()]
    totals = {k: sum(s[k] for s in stats) for k in COUNTS}
    broken = sum(1 for s in stats if s["rows_in"] != s["clean"] + s["quarantined"] + s["duplicates"])
    return dg.AssetCheckResult(
        check_name=ENGINE_CONSERVATION,
        passed=broken == 0,
        metadata={"batches_broken": broken, **totals, "partitions": len(stats)},
    )


PartitionOutcome = tuple[dict, pl.DataFrame]  # the sidecar's statistics (with batch_ids), the quarantine


def _clean_on_polars(context, store, tracks, users, now, rules) -> tuple[dict[str, PartitionOutcome], dict, dict]:
    """Each partition's raw file cleaned in this process; its clean file written."""
    per_partition: dict[str, PartitionOutcome] = {}
    reasons: dict[str, int] = {}
    for key in context.partition_keys:
        raw_file = store.batch_file(RAW_EVENTS_DATASET, key)
        raw = read_parquet(raw_file.path)
        result = clean_events(raw, tracks, users, now=now, origin=str(raw_file.path), rules=rules)
        store.write_batch_file(CLEAN_EVENTS_DATASET, raw_file.first, raw_file.last, result.clean)
        stats = {
            "rows_in": raw.height,
            **result.stats(),
            "duplicates_by_batch": dict(result.duplicates.iter_rows()),
            "batch_ids": raw["batch_id"].unique().sort().to_list(),
        }
        per_partition[key] = (stats, result.quarantined)
        if result.quarantined.height:
            for reason, n in result.quarantined.group_by(reason_category()).len().iter_rows():
                reasons[reason] = reasons.get(reason, 0) + n
    return per_partition, reasons, {"engine": dg.MetadataValue.text("polars")}


def _clean_on_spark(
    context, preparation, store, tracks, users, now, rules
) -> tuple[dict[str, PartitionOutcome], dict, dict, list[dg.AssetCheckResult]]:
    """Every partition of the run cleaned by one Spark application (through Pipes); its clean files
    then moved into place here, where the warehouse is."""
    keys = list(context.partition_keys)
    staging = store.staging_dir(context.run.run_id, "clean")
    remove_tree(staging)
    raw_files = {key: store.batch_file(RAW_EVENTS_DATASET, key) for key in keys}
    try:
        # The catalogue, as the job reads it: a snapshot beside its output.
        write_parquet_atomic(tracks, staging / "tracks.parquet")
        write_parquet_atomic(users, staging / "users.parquet")
        extras = {
            "task": "clean",
            "partitions": [{"key": k, "raw": spark_uri(f.path), "origin": str(f.path)} for k, f in raw_files.items()],
            "tracks": spark_uri(staging / "tracks.parquet"),
            "users": spark_uri(staging / "users.parquet"),
            "staging": spark_uri(staging),
            "now": now.isoformat(),
            "rules": {
                "max_ms_played": rules.max_ms_played,
                "future_tolerance_seconds": rules.future_tolerance.total_seconds(),
                "earliest": rules.earliest.isoformat(),
                "bot_plays_per_hour": rules.bot_plays_per_hour,
            },
        }
        materialized, checks = preparation.run_spark(context, extras)
        per_partition = _adopt_spark_output(store, staging, keys)
    finally:
        remove_tree(staging)  # a failed job leaves nothing behind either
    reported = materialized.metadata or {}
    reasons = dict(reported["quarantined_by_reason"].value) if "quarantined_by_reason" in reported else {}
    engine = {"engine": dg.MetadataValue.text("spark")}
    engine.update({k: v for k, v in reported.items() if k.startswith("spark_")})
    return per_partition, reasons, engine, checks


def _adopt_spark_output(store, staging, keys: list[str]) -> dict[str, PartitionOutcome]:
    """Move each partition's clean file from the job's staging directory into place; its statistics
    and quarantine rows from the job's."""
    stats_parts = parquet_parts(staging / "stats")
    stats = (
        scan_parquet(stats_parts).collect()
        if stats_parts
        else pl.DataFrame(schema={GROUP: pl.String, "batch_id": pl.Int64, **dict.fromkeys(COUNTS, pl.Int64)})
    )
    quarantine_parts = parquet_parts(staging / "quarantine")
    quarantine = (
        scan_parquet(quarantine_parts).collect()
        if quarantine_parts
        else empty_frame({**QUARANTINE_SCHEMA, GROUP: pl.String()})
    )
    per_partition: dict[str, PartitionOutcome] = {}
    for key in keys:
        parts = parquet_parts(staging / "clean" / f"{GROUP}={key}")
        target = store.batch_file(CLEAN_EVENTS_DATASET, key).path
        if len(parts) > 1:
            raise RuntimeError(f"the Spark job wrote {len(parts)} files for {key}, expected one")
        if parts:
            move_file(parts[0], target)
        else:  # every row of the partition was quarantined or a duplicate
            write_parquet_atomic(empty_frame(CLEAN_SCHEMA), target)
        batches = stats.filter(pl.col(GROUP) == key).sort("batch_id")
        per_partition[key] = (
            {
                **{k: int(batches[k].sum()) for k in COUNTS},
                "duplicates_by_batch": dict(
                    batches.filter(pl.col("duplicates") > 0).select("batch_id", "duplicates").iter_rows()
                ),
                "batch_ids": batches["batch_id"].to_list(),
            },
            conform(quarantine.filter(pl.col(GROUP) == key), QUARANTINE_SCHEMA),
        )
    return per_partition
