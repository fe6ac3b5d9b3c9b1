"""Features: track/artist features and the positive interactions the model trains on.

There is no user-features asset: the query tower's user features are computed per split from the
train side only (``ml.two_tower.query_features``), so that the holdout never leaks into them.
"""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation at
# definition time and rejects it as a string. Python 3.11 needs the import for nothing else.

import dagster as dg
import polars as pl

from recsys_assets import automation
from recsys_assets.constants import CLEAN_EVENTS_DATASET, FEATURES, FEATURES_FRESHNESS
from recsys_assets.data import features as F
from recsys_assets.metadata import markdown_table, time_range
from recsys_assets.resources import PreparedDataResource


def _written(store, name: str, df: pl.DataFrame, extra: dict[str, object] | None = None) -> dg.MaterializeResult:
    path = store.write_table(name, df)
    metadata: dict[str, object] = {
        "dagster/row_count": dg.MetadataValue.int(df.height),
        "columns": dg.MetadataValue.int(df.width),
        "path": dg.MetadataValue.path(str(path)),
        "preview": markdown_table(df),
        "dagster/column_schema": dg.TableSchema(
            columns=[dg.TableColumn(name, str(dtype)) for name, dtype in df.schema.items()]
        ),
    }
    metadata.update(extra or {})
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    group_name=FEATURES,
    deps=["clean_listening_events"],
    kinds={"polars", "parquet"},
    freshness_policy=FEATURES_FRESHNESS,
    automation_condition=automation.prepared_data,
)
def track_features(prepared: PreparedDataResource) -> dg.MaterializeResult:
    """Per-track features with their artist's: plays, listeners, skip rate, completion, popularity."""
    store = prepared.get_store()
    df = F.track_features(store.scan(CLEAN_EVENTS_DATASET)).collect(engine="streaming")
    top = df.sort("plays", descending=True).select("track_id", "artist_id", "genre", "plays", "listeners", "skip_rate")
    return _written(
        store,
        "track_features",
        df,
        {
            "artists": dg.MetadataValue.int(df["artist_id"].n_unique()),
            "most_played": markdown_table(top),
            # Long tail: the share of plays that goes to the top 1% of tracks.
            "top_1pct_play_share": dg.MetadataValue.float(
                float(top.head(max(1, df.height // 100))["plays"].sum() / max(1, df["plays"].sum()))
            ),
        },
    )


@dg.asset(
    group_name=FEATURES,
    deps=["clean_listening_events"],
    kinds={"polars", "parquet"},
    freshness_policy=FEATURES_FRESHNESS,
    automation_condition=automation.prepared_data,
)
def training_interactions(prepared: PreparedDataResource) -> dg.MaterializeResult:
    """Positive interactions (non-skip plays and likes of non-bot users) with weights, for training."""
    store = prepared.get_store()
    df = F.training_interactions(store.scan(CLEAN_EVENTS_DATASET)).collect(engine="streaming")
    return _written(
        store,
        "training_interactions",
        df,
        {
            "users": dg.MetadataValue.int(df["user_id"].n_unique()),
            "tracks": dg.MetadataValue.int(df["track_id"].n_unique()),
            "liked_share": dg.MetadataValue.float(float(df["liked"].mean() or 0.0)),
            **time_range(df),
        },
    )
