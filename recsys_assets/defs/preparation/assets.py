"""Preparation: clean, normalised listening events, with the rejected rows in quarantine."""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation at
# definition time and rejects it as a string. Python 3.11 needs the import for nothing else.

from datetime import UTC, datetime, timedelta

import dagster as dg
import polars as pl
from pydantic import Field

from recsys_assets import automation
from recsys_assets.constants import CLEAN_EVENTS_DATASET, PREPARATION, RAW_EVENTS_DATASET
from recsys_assets.data.cleaning import CleaningRules, clean_events
from recsys_assets.data.store import read_parquet, write_json_atomic
from recsys_assets.defs.ingestion.partitions import ingest_batches
from recsys_assets.metadata import counts_table, markdown_table, reason_category, time_range
from recsys_assets.resources import PreparedDataResource, WarehouseResource
from recsys_core.contracts import TRACKS_SCHEMA, USERS_SCHEMA


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
    # A changed rule is applied to history by a backfill: one run for all the ranges it re-cleans.
    backfill_policy=dg.BackfillPolicy.single_run(),
    kinds={"polars", "parquet"},
    tags={"recsys/stage": "preparation"},
    automation_condition=automation.after_inputs_change,
)
def clean_listening_events(
    context: dg.AssetExecutionContext,
    config: CleaningConfig,
    warehouse: WarehouseResource,
    prepared: PreparedDataResource,
) -> dg.MaterializeResult:
    """Clean listening events: de-duplicated, typed, in UTC, clipped, enriched and flagged, per partition.

    Each partition's raw file is cleaned on its own and its clean file replaced, so a backfill
    re-cleans exactly the partitions it names; rows that break the contract go to the warehouse's
    quarantine table with their reason (the partition's earlier quarantine is replaced).
    """
    store = prepared.get_store()
    wh = warehouse.get_warehouse()
    tracks = wh.table("tracks", TRACKS_SCHEMA)
    users = wh.table("users", USERS_SCHEMA)
    now = datetime.now(UTC)
    rules = config.rules()
    totals = {"rows_in": 0, "clean": 0, "quarantined": 0, "duplicates": 0}
    reasons: dict[str, int] = {}
    last_clean = pl.DataFrame()
    for key in context.partition_keys:
        raw_file = store.batch_file(RAW_EVENTS_DATASET, key)
        raw = read_parquet(raw_file.path)
        result = clean_events(raw, tracks, users, now=now, origin=str(raw_file.path), rules=rules)
        wh.replace_quarantine("cleaning", raw["batch_id"].unique().sort().to_list(), result.quarantined)
        store.write_batch_file(CLEAN_EVENTS_DATASET, raw_file.first, raw_file.last, result.clean)
        stats = {
            "rows_in": raw.height,
            **result.stats(),
            "duplicates_by_batch": dict(result.duplicates.iter_rows()),
        }
        write_json_atomic(stats, store.sidecar(CLEAN_EVENTS_DATASET, raw_file))
        for k in totals:
            totals[k] += stats[k]
        if result.quarantined.height:
            for reason, n in result.quarantined.group_by(reason_category()).len().iter_rows():
                reasons[reason] = reasons.get(reason, 0) + n
        last_clean = result.clean
        context.log.info(f"cleaned {key}: {stats}")

    metadata: dict[str, object] = {
        "dagster/row_count": dg.MetadataValue.int(totals["clean"]),
        "rows_in": dg.MetadataValue.int(totals["rows_in"]),
        "quarantined": dg.MetadataValue.int(totals["quarantined"]),
        "duplicates": dg.MetadataValue.int(totals["duplicates"]),
        "partitions": dg.MetadataValue.int(len(context.partition_keys)),
        "quarantined_by_reason": counts_table(reasons),
        "rules": dg.MetadataValue.json(config.model_dump()),
        "path": dg.MetadataValue.path(str(store.dataset_dir(CLEAN_EVENTS_DATASET))),
    }
    if last_clean.height:
        metadata["users"] = dg.MetadataValue.int(last_clean["user_id"].n_unique())
        metadata["suspected_bot_rows"] = dg.MetadataValue.int(int(last_clean["suspected_bot"].sum()))
        metadata["unknown_track_rows"] = dg.MetadataValue.int(int((~last_clean["known_track"]).sum()))
        metadata.update(time_range(last_clean))
        metadata["preview"] = markdown_table(last_clean.drop("ingested_at"))
    return dg.MaterializeResult(metadata=metadata)
