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
    """Clean listening events: de-duplicated, typed, in UTC, clipped, enriched and flagged.

    Each raw file not cleaned yet is cleaned on its own (so a refresh costs in proportion to the new
    rows); rows that break the contract go to the warehouse's quarantine table with their reason.
    """
    store = prepared.get_store()
    wh = warehouse.get_warehouse()
    done = {f.stem for f in store.batch_files(CLEAN_EVENTS_DATASET)}
    pending = [f for f in store.batch_files(RAW_EVENTS_DATASET) if f.stem not in done]
    tracks = wh.table("tracks", TRACKS_SCHEMA)
    users = wh.table("users", USERS_SCHEMA)
    now = datetime.now(UTC)
    rules = config.rules()
    totals = {"rows_in": 0, "clean": 0, "quarantined": 0, "duplicates": 0}
    reasons: dict[str, int] = {}
    last_clean = pl.DataFrame()
    for raw_file in pending:
        raw = read_parquet(raw_file.path)
        result = clean_events(raw, tracks, users, now=now, origin=str(raw_file.path), rules=rules)
        batch_ids = raw["batch_id"].unique().sort().to_list()
        # Quarantine first: the clean file's existence marks the raw file as done, so a crash in
        # between is repaired by the next run (the quarantine of those batches is replaced).
        wh.replace_quarantine("cleaning", batch_ids, result.quarantined)
        store.write_batch_file(CLEAN_EVENTS_DATASET, raw_file.first, raw_file.last, result.clean)
        stats = {
            "rows_in": raw.height,
            **result.stats(),
            "duplicates_by_batch": dict(result.duplicates.iter_rows()),
        }
        write_json_atomic(stats, store.sidecar(CLEAN_EVENTS_DATASET, raw_file))
        for key in totals:
            totals[key] += stats[key]
        if result.quarantined.height:
            for reason, n in result.quarantined.group_by(reason_category()).len().iter_rows():
                reasons[reason] = reasons.get(reason, 0) + n
        last_clean = result.clean
        context.log.info(f"cleaned {raw_file.path.name}: {stats}")

    metadata: dict[str, object] = {
        "new_rows_in": dg.MetadataValue.int(totals["rows_in"]),
        "new_clean": dg.MetadataValue.int(totals["clean"]),
        "new_quarantined": dg.MetadataValue.int(totals["quarantined"]),
        "new_duplicates": dg.MetadataValue.int(totals["duplicates"]),
        "files_cleaned": dg.MetadataValue.int(len(pending)),
        "quarantined_by_reason": counts_table(reasons),
        "path": dg.MetadataValue.path(str(store.dataset_dir(CLEAN_EVENTS_DATASET))),
    }
    if store.batch_files(CLEAN_EVENTS_DATASET):
        everything = store.scan(CLEAN_EVENTS_DATASET)
        summary = everything.select(
            pl.len().alias("rows"),
            pl.col("user_id").n_unique().alias("users"),
            pl.col("track_id").n_unique().alias("tracks"),
            pl.col("suspected_bot").sum().alias("bot_rows"),
            (~pl.col("known_track")).sum().alias("unknown_track_rows"),
        ).collect()
        metadata["dagster/row_count"] = dg.MetadataValue.int(summary["rows"].item())
        metadata["users"] = dg.MetadataValue.int(summary["users"].item())
        metadata["tracks"] = dg.MetadataValue.int(summary["tracks"].item())
        metadata["suspected_bot_rows"] = dg.MetadataValue.int(summary["bot_rows"].item())
        metadata["unknown_track_rows"] = dg.MetadataValue.int(summary["unknown_track_rows"].item())
        metadata.update(time_range(everything))
    if last_clean.height:
        metadata["preview"] = markdown_table(last_clean.drop("ingested_at"))
    return dg.MaterializeResult(metadata=metadata)
