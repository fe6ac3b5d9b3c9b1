"""Monitoring: data drift of recent listening against the champion's training data (Evidently)."""

# No `from __future__ import annotations` here (see defs/training/assets.py).

from datetime import datetime

import dagster as dg
import polars as pl
from pydantic import Field

from recsys_assets import automation
from recsys_assets.constants import CLEAN_EVENTS_DATASET, MONITORING
from recsys_assets.metadata import markdown_table
from recsys_assets.resources import MLflowResource, PreparedDataResource, RecsysHomeResource, RetrainPolicyResource
from recsys_core.registry import CHAMPION
from recsys_core.settings import load_settings


class DriftConfig(dg.Config):
    """What the drift report compares."""

    window_days: float | None = Field(
        default=None,
        description="Length of the reference and of the current window; unset: the retrain policy's "
        "(RECSYS_DRIFT_WINDOW_DAYS).",
    )
    sample_rows: int = Field(default=20_000, description="Rows sampled from each window (bounds the cost).")
    drift_share: float | None = Field(
        default=None,
        description="Share of drifted columns from which the data counts as drifted; unset: the retrain "
        "policy's (RECSYS_DRIFT_SHARE).",
    )
    seed: int = Field(default=0, description="Seed of the sampling.")


def drift_report(
    context: dg.AssetExecutionContext,
    config: DriftConfig,
    prepared: PreparedDataResource,
    mlflow: MLflowResource,
    recsys_home: RecsysHomeResource,
    retrain_policy: RetrainPolicyResource,
) -> dg.MaterializeResult:
    """Evidently data-drift report: the latest days of listening against as many events of the
    champion's latest training data.

    Columns: genre mix, user activity, track popularity, ``ms_played``, skips. The HTML report is kept
    under ``$RECSYS_HOME/reports/drift``; a drift share past the threshold makes the drift sensor start
    a retrain.
    """
    from recsys_assets.ml.drift import current_window, drift_frame, reference_window, run_drift

    champion = mlflow.get_registry().by_alias(CHAMPION)
    if champion is None or not champion.lineage("max_played_at"):
        return dg.MaterializeResult(
            metadata={
                "status": dg.MetadataValue.text("no champion to compare with yet"),
                "drift_share": 0.0,
                "drifted": False,
            }
        )
    window_days = config.window_days if config.window_days is not None else retrain_policy.drift_window_days
    threshold = config.drift_share if config.drift_share is not None else retrain_policy.drift_share
    store = prepared.get_store()
    events = store.scan(CLEAN_EVENTS_DATASET)
    tracks = store.scan_table("track_features")
    latest = events.select(pl.col("played_at").max()).collect().item()
    reference_end = datetime.fromisoformat(champion.lineage("max_played_at"))
    recent = current_window(events, latest, window_days).collect(engine="streaming")
    older = reference_window(events, reference_end, recent.height).collect(engine="streaming")
    current = drift_frame(recent.lazy(), tracks, config.sample_rows, config.seed + 1)
    reference = drift_frame(older.lazy(), tracks, config.sample_rows, config.seed)
    path = recsys_home.reports_dir / "drift" / f"{context.run.run_id}.html"
    result = run_drift(reference, current, threshold, path)
    context.log.info(
        f"drift share {result.drift_share:.0%} ({'drifted' if result.drifted else 'no drift'}) in {result.seconds:.1f}s"
    )
    return dg.MaterializeResult(
        metadata={
            "drift_share": dg.MetadataValue.float(result.drift_share),
            "drifted": dg.MetadataValue.bool(result.drifted),
            "threshold": dg.MetadataValue.float(threshold),
            "columns": markdown_table(result.columns),
            "report": dg.MetadataValue.path(str(path)),
            "reference_window": dg.MetadataValue.text(_span(older)),
            "current_window": dg.MetadataValue.text(_span(recent)),
            "reference_rows": dg.MetadataValue.int(result.reference_rows),
            "current_rows": dg.MetadataValue.int(result.current_rows),
            "seconds": dg.MetadataValue.float(round(result.seconds, 2)),
            "champion_version": dg.MetadataValue.int(champion.version),
        }
    )


def _span(window: pl.DataFrame) -> str:
    if window.is_empty():
        return "no events"
    first, last = window["played_at"].min(), window["played_at"].max()
    return f"{first:%Y-%m-%d %H:%M} → {last:%Y-%m-%d %H:%M} ({window.height:,} events)"


@dg.definitions
def assets() -> dg.Definitions:
    # The report's cadence is a definition-time value: read when the definitions load, not at import.
    cron = load_settings().automation.drift_cron
    return dg.Definitions(
        assets=[
            dg.asset(
                name="drift_report",
                group_name=MONITORING,
                deps=["clean_listening_events", "track_features"],
                kinds={"evidently"},
                # The report reads the clean events that are prepared: a partition that landed a moment
                # ago does not hold it back (track_features, its other input, needs some clean events).
                automation_condition=automation.on_cadence(
                    cron, "drift_cadence", partial=dg.AssetSelection.assets("clean_listening_events")
                ),
            )(drift_report)
        ]
    )
