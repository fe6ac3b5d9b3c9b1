"""The data contracts of DESIGN.md, as polars schemas and SQL DDL written once for both warehouses.

The SQL below is the common subset of DuckDB and PostgreSQL, so the embedded default and the
production warehouse run the very same statements.
"""

from __future__ import annotations

import polars as pl

EVENT_TYPES = ("play", "skip", "like", "dislike", "impression", "click")
SOURCES = ("organic", "recommendation")
# Event types that say the user wanted the track: the positives of training.
POSITIVE_EVENT_TYPES = ("play", "like")

UTC = pl.Datetime("us", "UTC")

# The raw table as landed: typed, not yet validated beyond types (cleaning does that).
LISTENING_EVENTS_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.String(),
    "user_id": pl.String(),
    "track_id": pl.String(),
    "artist_id": pl.String(),
    "played_at": UTC,
    "ms_played": pl.Int64(),
    "track_duration_ms": pl.Int64(),
    "event_type": pl.String(),
    "source": pl.String(),
    "model_version": pl.String(),
    "variant": pl.String(),
}
# Columns the warehouse adds when a batch lands.
LANDING_COLUMNS: dict[str, pl.DataType] = {"ingested_at": UTC, "batch_id": pl.Int64()}
RAW_EVENTS_SCHEMA = {**LISTENING_EVENTS_SCHEMA, **LANDING_COLUMNS}
REQUIRED_EVENT_COLUMNS = ("event_id", "user_id", "track_id", "played_at", "event_type")

TRACKS_SCHEMA: dict[str, pl.DataType] = {
    "track_id": pl.String(),
    "artist_id": pl.String(),
    "genre": pl.String(),
    "duration_ms": pl.Int64(),
    "release_date": pl.Date(),
}
USERS_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.String(),
    "country": pl.String(),
    "signup_date": pl.Date(),
}

QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "batch_id": pl.Int64(),
    "stage": pl.String(),  # "landing" (could not be typed) or "cleaning" (broke a contract rule)
    "origin": pl.String(),  # file path, "simulator", "serving-feedback", …
    "line_number": pl.Int64(),  # 1-based line in the origin file, when there is one
    "event_id": pl.String(),
    "reason": pl.String(),  # names the field and the value
    "original": pl.String(),  # the original values, as JSON or the raw line
}

DDL = [
    """
    CREATE TABLE IF NOT EXISTS ingest_batches (
        batch_id BIGINT PRIMARY KEY,
        source VARCHAR NOT NULL,
        origin VARCHAR NOT NULL,
        content_hash VARCHAR,
        rows_in BIGINT NOT NULL,
        landed BIGINT NOT NULL,
        quarantined BIGINT NOT NULL,
        duplicates BIGINT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS listening_events (
        event_id VARCHAR PRIMARY KEY,
        user_id VARCHAR NOT NULL,
        track_id VARCHAR NOT NULL,
        artist_id VARCHAR,
        played_at TIMESTAMPTZ NOT NULL,
        ms_played BIGINT,
        track_duration_ms BIGINT,
        event_type VARCHAR NOT NULL,
        source VARCHAR,
        model_version VARCHAR,
        variant VARCHAR,
        ingested_at TIMESTAMPTZ NOT NULL,
        batch_id BIGINT NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS listening_events_batch ON listening_events (batch_id)",
    """
    CREATE TABLE IF NOT EXISTS tracks (
        track_id VARCHAR PRIMARY KEY,
        artist_id VARCHAR,
        genre VARCHAR,
        duration_ms BIGINT,
        release_date DATE
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS users (
        user_id VARCHAR PRIMARY KEY,
        country VARCHAR,
        signup_date DATE
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS quarantine (
        batch_id BIGINT NOT NULL,
        stage VARCHAR NOT NULL,
        origin VARCHAR NOT NULL,
        line_number BIGINT,
        event_id VARCHAR,
        reason VARCHAR NOT NULL,
        original VARCHAR,
        quarantined_at TIMESTAMPTZ NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS quarantine_batch ON quarantine (batch_id, stage)",
]


def empty_frame(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def conform(df: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Select ``schema``'s columns in order, adding missing ones as nulls and casting the rest.

    Raises:
        polars.exceptions.InvalidOperationError: a column cannot be cast; callers that accept
            untrusted values parse them first (see ``importers``) so that this never happens.
    """
    if df.width == 0:
        return empty_frame(schema)
    missing = [pl.lit(None, dtype).alias(name) for name, dtype in schema.items() if name not in df.columns]
    # with_columns broadcasts the literals to the frame's height (select alone would give one row).
    return df.with_columns(missing).select([pl.col(name).cast(dtype) for name, dtype in schema.items()])
