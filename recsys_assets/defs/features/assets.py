"""Features: track/artist features and the positive interactions the model trains on.

There is no user-features asset: the query tower's user features are computed per split from the
train side only (``ml.two_tower.query_features``), so that the holdout never leaks into them.
"""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation at
# definition time and rejects it as a string. Python 3.11 needs the import for nothing else.

import dagster as dg
import polars as pl

from recsys_assets import automation
from recsys_assets.constants import CLEAN_EVENTS_DATASET, FEATURES, FEATURES_FRESHNESS, PREPARATION_POD
from recsys_assets.data import features as F
from recsys_assets.data.store import move_file, parquet_parts, remove_tree, spark_uri
from recsys_assets.metadata import markdown_table, time_range
from recsys_assets.resources import PreparationEngineResource, PreparedDataResource


def _written(store, name: str, extra: dict[str, object] | None = None) -> dg.MaterializeResult:
    """The metadata of a table as written, read back lazily (whichever engine wrote it)."""
    table = store.scan_table(name)
    schema = table.collect_schema()
    metadata: dict[str, object] = {
        "dagster/row_count": dg.MetadataValue.int(int(table.select(pl.len()).collect().item())),
        "columns": dg.MetadataValue.int(len(schema)),
        "path": dg.MetadataValue.path(str(store.table_path(name))),
        "preview": markdown_table(table.head(10).collect()),
        "dagster/column_schema": dg.TableSchema(columns=[dg.TableColumn(n, str(dtype)) for n, dtype in schema.items()]),
    }
    metadata.update(extra or {})
    return dg.MaterializeResult(metadata=metadata)


def _build(
    context: dg.AssetExecutionContext, name: str, prepared: PreparedDataResource, preparation: PreparationEngineResource
) -> tuple[object, dict[str, object]]:
    """Build the table ``name`` from every clean partition, with the configured engine; the store
    and the engine's metadata."""
    store = prepared.get_store()
    if not preparation.on_spark:
        build = {"track_features": F.track_features, "training_interactions": F.training_interactions}[name]
        store.write_table(name, build(store.scan(CLEAN_EVENTS_DATASET)).collect(engine="streaming"))
        return store, {"engine": dg.MetadataValue.text("polars")}
    staging = store.staging_dir(context.run.run_id, name)
    remove_tree(staging)
    clean_files = [spark_uri(f.path) for f in store.batch_files(CLEAN_EVENTS_DATASET)]
    if not clean_files:
        raise FileNotFoundError(f"no clean events in {store.dataset_dir(CLEAN_EVENTS_DATASET)}: materialize them first")
    try:
        reported, _ = preparation.run_spark(
            context, {"task": name, "clean": clean_files, "staging": spark_uri(staging)}
        )
        (part,) = parquet_parts(staging / name)
        move_file(part, store.table_path(name))
    finally:
        remove_tree(staging)
    engine: dict[str, object] = {"engine": dg.MetadataValue.text("spark")}
    engine.update({k: v for k, v in (reported.metadata or {}).items() if k.startswith("spark_")})
    return store, engine


# Both tables: built from every clean partition by the configured engine, in the preparation's pod.
feature_table = dg.asset(
    group_name=FEATURES,
    deps=["clean_listening_events"],
    kinds={"polars", "spark", "parquet"},
    op_tags=PREPARATION_POD,
    freshness_policy=FEATURES_FRESHNESS,
    automation_condition=automation.prepared_data,
)


@feature_table
def track_features(
    context: dg.AssetExecutionContext, prepared: PreparedDataResource, preparation: PreparationEngineResource
) -> dg.MaterializeResult:
    """Per-track features with their artist's: plays, listeners, skip rate, completion, popularity."""
    store, engine = _build(context, "track_features", prepared, preparation)
    df = (
        store.scan_table("track_features")
        .select("track_id", "artist_id", "genre", "plays", "listeners", "skip_rate")
        .collect()
    )
    top = df.sort("plays", descending=True)
    return _written(
        store,
        "track_features",
        {
            "artists": dg.MetadataValue.int(df["artist_id"].n_unique()),
            "most_played": markdown_table(top),
            # Long tail: the share of plays that goes to the top 1% of tracks.
            "top_1pct_play_share": dg.MetadataValue.float(
                float(top.head(max(1, df.height // 100))["plays"].sum() / max(1, df["plays"].sum()))
            ),
            **engine,
        },
    )


@feature_table
def training_interactions(
    context: dg.AssetExecutionContext, prepared: PreparedDataResource, preparation: PreparationEngineResource
) -> dg.MaterializeResult:
    """Positive interactions (non-skip plays and likes of non-bot users) with weights, for training."""
    store, engine = _build(context, "training_interactions", prepared, preparation)
    profile = (
        store.scan_table("training_interactions")
        .select(
            pl.col("user_id").n_unique().alias("users"),
            pl.col("track_id").n_unique().alias("tracks"),
            pl.col("liked").mean().alias("liked_share"),
        )
        .collect(engine="streaming")
        .row(0, named=True)
    )
    return _written(
        store,
        "training_interactions",
        {
            "users": dg.MetadataValue.int(profile["users"]),
            "tracks": dg.MetadataValue.int(profile["tracks"]),
            "liked_share": dg.MetadataValue.float(float(profile["liked_share"] or 0.0)),
            **time_range(store.scan_table("training_interactions")),
            **engine,
        },
    )
