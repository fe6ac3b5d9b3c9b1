"""Features and training interactions from clean listening events (pure polars, lazy).

Every function takes and returns a ``LazyFrame``, so the whole history is scanned from Parquet with
polars' streaming engine and memory stays bounded as events grow.
"""

from __future__ import annotations

import re
from datetime import datetime

import polars as pl

from recsys_assets.data.rules import LIKE_WEIGHT, POSITIVES
from recsys_core.contracts import UTC

MAX_GENRES = 24
GENRE_PREFIX = "genre_share__"

# The tables' contracts, for every engine (counts are Int64: Spark has no unsigned integers).
TRACK_FEATURES_SCHEMA: dict[str, pl.DataType] = {
    "track_id": pl.String(),
    "artist_id": pl.String(),
    "genre": pl.String(),
    "plays": pl.Int64(),
    "skips": pl.Int64(),
    "likes": pl.Int64(),
    "listeners": pl.Int64(),
    "skip_rate": pl.Float64(),
    "completion_mean": pl.Float64(),
    "last_played_at": UTC,
    "known_track": pl.Boolean(),
    "artist_plays": pl.Int64(),
    "artist_listeners": pl.Int64(),
    "popularity": pl.Float64(),
    "popularity_rank": pl.Float64(),
}
INTERACTIONS_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.String(),
    "track_id": pl.String(),
    "played_at": UTC,
    "weight": pl.Float64(),
    "liked": pl.Boolean(),
    "organic": pl.Boolean(),
}


def conformed(frame: pl.LazyFrame, schema: dict[str, pl.DataType]) -> pl.LazyFrame:
    """``frame`` with exactly the columns of ``schema``, in its order and of its types."""
    return frame.select([pl.col(name).cast(dtype) for name, dtype in schema.items()])


def genre_column(genre: str) -> str:
    """A column name for a genre's share (``hip-hop`` → ``genre_share__hip_hop``)."""
    return GENRE_PREFIX + (re.sub(r"[^0-9a-z]+", "_", genre.lower()).strip("_") or "unknown")


def top_genres(clean: pl.LazyFrame, limit: int = MAX_GENRES) -> list[str]:
    """The ``limit`` most played genres, most played first (ties by name)."""
    counts = (
        clean.filter(pl.col("event_type") == "play")
        .group_by("genre")
        .len()
        .sort(["len", "genre"], descending=[True, False])
        .head(limit)
        .collect(engine="streaming")
    )
    return counts["genre"].to_list()


def track_features(clean: pl.LazyFrame) -> pl.LazyFrame:
    """One row per track: plays, listeners, skip rate, completion, popularity; and its artist's."""
    play = pl.col("event_type") == "play"
    skip = pl.col("event_type") == "skip"
    tracks = clean.group_by("track_id").agg(
        # The smallest, not the first: a rule must not depend on the order rows arrive in (Spark has none).
        pl.col("artist_id").min().alias("artist_id"),
        pl.col("genre").min().alias("genre"),
        play.sum().alias("plays"),
        skip.sum().alias("skips"),
        (pl.col("event_type") == "like").sum().alias("likes"),
        pl.col("user_id").filter(play).n_unique().alias("listeners"),
        (skip.sum() / (play | skip).sum().clip(lower_bound=1)).alias("skip_rate"),
        pl.col("completion").filter(play | skip).mean().alias("completion_mean"),
        pl.col("played_at").max().alias("last_played_at"),
        pl.col("known_track").all().alias("known_track"),
    )
    artists = (
        clean.filter(pl.col("artist_id").is_not_null())
        .group_by("artist_id")
        .agg(
            play.sum().alias("artist_plays"),
            pl.col("user_id").filter(play).n_unique().alias("artist_listeners"),
        )
    )
    return (
        tracks.join(artists, on="artist_id", how="left")
        .with_columns(
            # Popularity: the share of plays, and its percentile rank among tracks (0 = least played).
            (pl.col("plays") / pl.col("plays").sum().clip(lower_bound=1)).alias("popularity"),
            ((pl.col("plays").rank("average") - 1) / (pl.len() - 1).clip(lower_bound=1)).alias("popularity_rank"),
        )
        .pipe(conformed, TRACK_FEATURES_SCHEMA)
        .sort("track_id")
    )


def is_positive() -> pl.Expr:
    """The rule of a training positive: a non-skip play or a like, by a user not flagged as a bot."""
    return pl.col("event_type").is_in(POSITIVES) & ~pl.col("suspected_bot")


def positive_events_after(clean: pl.LazyFrame, since: datetime | None) -> int:
    """Clean events that are training positives, played after ``since`` (all of them for ``None``)."""
    positives = clean.filter(is_positive())
    if since is not None:
        positives = positives.filter(pl.col("played_at") > since)
    return int(positives.select(pl.len()).collect(engine="streaming").item())


def training_interactions(clean: pl.LazyFrame) -> pl.LazyFrame:
    """Positive interactions, one per (user, track, instant), with weights.

    Positives are non-skip plays and likes of users not flagged as bots. A play weighs its
    completion (1 when unknown), a like :data:`LIKE_WEIGHT`; a play and a like of the same track at
    the same instant (MovieLens ratings) make one interaction with the summed weight. Track
    attributes (artist, genre) live in :func:`track_features`; keeping them out of this table halves
    the memory of the grouping. ``organic`` is false for feedback on our own recommendations (the
    evaluation leaves those out of the holdout). Rows come in no particular order (the split sorts).
    """
    weight = (
        pl.when(pl.col("event_type") == "like")
        .then(LIKE_WEIGHT)
        .otherwise(pl.col("completion").fill_null(1.0).clip(0.0, 1.0))
    )
    return (
        clean.filter(is_positive())
        .select(
            "user_id",
            "track_id",
            "played_at",
            weight.alias("weight"),
            (pl.col("event_type") == "like").alias("liked"),
            (pl.col("source") != "recommendation").alias("organic"),
        )
        .group_by("user_id", "track_id", "played_at")
        .agg(pl.col("weight").sum(), pl.col("liked").any(), pl.col("organic").all())
        .pipe(conformed, INTERACTIONS_SCHEMA)
    )
