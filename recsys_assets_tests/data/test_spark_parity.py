"""Parity: the Spark preparation (``data.spark_prep``) gives what the polars one gives, on generated data
with every malformed case the polars tests cover.

One local Spark session (``local[2]``) for the module; the comparisons use ``pyspark.testing``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
from pyspark.sql import SparkSession
from pyspark.testing import assertDataFrameEqual

from recsys_assets.data import features as PF
from recsys_assets.data import spark_prep as S
from recsys_assets.data.cleaning import CleaningRules, clean_events
from recsys_core.contracts import LISTENING_EVENTS_SCHEMA, RAW_EVENTS_SCHEMA, TRACKS_SCHEMA, USERS_SCHEMA, conform

NOW = datetime(2026, 6, 1, tzinfo=UTC)
RULES = CleaningRules(bot_plays_per_hour=40)
KEYS = ("batches-0000000001-0000000002", "batches-0000000003-0000000004")


@pytest.fixture(scope="module")
def spark():
    session = (
        SparkSession.builder.master("local[2]")
        .appName("recsys-parity")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    yield session
    session.stop()


@pytest.fixture(scope="module")
def world() -> tuple[dict[str, pl.DataFrame], pl.DataFrame, pl.DataFrame]:
    """Two partitions of two batches each: simulated events plus every malformed case."""
    from recsys_sim.simulator import World

    start = NOW - timedelta(days=3)
    w = World.create(users=60, tracks=200, seed=5, start=start, end=NOW)
    events = conform(pl.concat(list(w.generate(start, NOW - timedelta(hours=1)))).head(3000), LISTENING_EVENTS_SCHEMA)
    tracks = conform(w.tracks_frame(), TRACKS_SCHEMA)
    # A catalogue track with a zero duration: its completion is unknown, not infinite.
    tracks = pl.concat(
        [
            tracks,
            tracks.head(1).with_columns(pl.lit("t-zero").alias("track_id"), pl.lit(0, pl.Int64).alias("duration_ms")),
        ]
    )
    users = conform(w.users_frame(), USERS_SCHEMA)
    ok = events.row(0, named=True)
    at = ok["played_at"]

    def row(event_id: str | None, **overrides) -> dict:
        return {**ok, "event_id": event_id, **overrides}

    malformed = [
        row("m-null-user", user_id=None),
        row("m-blank-track", track_id=" \t "),
        row(None),  # a null event_id (twice: the second is a duplicate of the first)
        row(None, user_id="other"),
        row("  "),
        row("m-type", event_type="listen"),
        row("m-type-null", event_type=None),
        row("m-type-case", event_type="  PLAY "),
        row("m-type-unicode-space", event_type="\u3000Skip\u2003\x85"),
        row("m-source", source="Radio"),
        row("m-source-case", source=" RECOMMENDATION"),
        row("m-source-null", source=None),
        row("m-when-null", played_at=None),
        row("m-old", played_at=datetime(1999, 12, 31, 23, 59, 59, 250000, tzinfo=UTC)),
        row("m-future", played_at=NOW + timedelta(days=2, microseconds=17)),
        row("m-future-ms", played_at=NOW + timedelta(days=3, milliseconds=5)),
        row("m-negative", ms_played=-5),
        row("m-absurd", ms_played=10**11),
        row("m-ms-null", ms_played=None),
        row("m-duration", track_duration_ms=0),
        row("m-clipped", ms_played=10**7, track_duration_ms=None),
        row("m-unknown-track", track_id="t-nowhere", artist_id=None, track_duration_ms=None),
        row("m-zero-duration", track_id="t-zero", track_duration_ms=None),
        row("m-unknown-user", user_id="u-nowhere"),
        row("m-spaces", user_id=f" {ok['user_id']}\u00a0", track_id=f"{ok['track_id']}  "),
        row("m-long", event_type="é" * 100 + '"quoted"\nline'),
        row("m-late", played_at=at - timedelta(days=30)),  # late: a month before its batch
        row("m-like", event_type="like", ms_played=None),
        row("m-like-same-instant", event_type="like", ms_played=None, track_id=ok["track_id"]),
    ]
    # A bot: 60 plays in one clock hour (over the threshold of 40), and a burst of ratings (no ms_played).
    hour = at.replace(minute=0, second=0, microsecond=0)
    bot = [
        row(
            f"bot-{i}",
            user_id="bot-user",
            event_type="play",
            played_at=hour + timedelta(seconds=20 * i),
            ms_played=30_000,
        )
        for i in range(60)
    ]
    burst = [
        row(f"rate-{i}", user_id="rater", played_at=at + timedelta(seconds=i), ms_played=None, event_type="like")
        for i in range(60)
    ]
    raw = pl.concat([events, pl.DataFrame(malformed, schema=events.schema)])
    raw = raw.with_columns(pl.int_range(raw.height).mod(4).add(1).alias("batch_id"))
    # The bot and the burst land in one batch, so that each is within one partition.
    raw = pl.concat(
        [raw, pl.DataFrame(bot + burst, schema=events.schema).with_columns(pl.lit(3).alias("batch_id"))],
        how="vertical_relaxed",
    )
    raw = raw.with_columns(pl.lit(NOW).alias("ingested_at")).sort("batch_id", maintain_order=True)
    # Duplicates: within a batch, across batches of one partition (with other values: the first
    # one wins), and across partitions (kept in each, as each partition is cleaned on its own).
    dups = pl.concat(
        [
            raw.head(20),
            raw.filter(pl.col("batch_id") == 1)
            .head(5)
            .with_columns(pl.lit(2).alias("batch_id"), pl.lit(-1).alias("ms_played")),
        ],
        how="vertical_relaxed",
    )
    across = raw.filter(pl.col("batch_id") == 1).tail(3).with_columns(pl.lit(3).alias("batch_id"))
    raw = conform(pl.concat([raw, dups, across], how="vertical_relaxed"), RAW_EVENTS_SCHEMA).sort(
        "batch_id", maintain_order=True
    )
    parts = {
        KEYS[0]: raw.filter(pl.col("batch_id") <= 2),
        KEYS[1]: raw.filter(pl.col("batch_id") >= 3),
    }
    return parts, tracks, users


def _polars(world):
    parts, tracks, users = world
    results = {
        k: clean_events(df, tracks, users, now=NOW, origin=f"raw/{k}.parquet", rules=RULES) for k, df in parts.items()
    }
    return results


def _spark(spark, world):
    parts, tracks, users = world
    raw = pl.concat(
        [
            df.with_columns(
                pl.lit(k).alias(S.GROUP),
                pl.int_range(df.height).cast(pl.Int64).alias(S.ORDER),
                pl.lit(f"raw/{k}.parquet").alias(S.ORIGIN),
            )
            for k, df in parts.items()
        ]
    )
    frame = spark.createDataFrame(raw.to_arrow())
    return S.clean_events(
        frame, spark.createDataFrame(tracks.to_arrow()), spark.createDataFrame(users.to_arrow()), now=NOW, rules=RULES
    )


def test_the_generated_data_has_every_case(world) -> None:
    parts, _, _ = world
    raw = pl.concat(parts.values())
    result = pl.concat(r.quarantined for r in _polars(world).values())
    categories = set(result["reason"].str.replace(r"=.*?: ", ": ").to_list())
    assert {
        "event_id is empty", "user_id is empty", "track_id is empty", "played_at is empty",
        "event_type: not one of play, skip, like, dislike, impression, click",
        "source: not one of organic, recommendation", "ms_played: negative",
        "played_at: before 2000-01-01", "track_duration_ms: not positive",
    } <= categories  # fmt: skip
    assert any(r.startswith("played_at=") and "in the future" in r for r in result["reason"])
    assert any("absurd" in r for r in result["reason"])
    clean = pl.concat(r.clean for r in _polars(world).values())
    assert clean["suspected_bot"].any()
    assert (~clean["known_track"]).any()
    assert (~clean["known_user"]).any()
    assert clean["ms_clipped"].any()
    assert clean["completion"].is_null().any()
    assert sum(r.stats()["duplicates"] for r in _polars(world).values()) >= 25
    assert raw.height > 1000


def test_cleaning_is_the_same_on_spark(spark, world) -> None:
    expected = _polars(world)
    got = _spark(spark, world)
    for key, result in expected.items():
        clean = got.clean.where(got.clean[S.GROUP] == key).drop(S.GROUP)
        assertDataFrameEqual(clean, spark.createDataFrame(result.clean.to_arrow()), checkRowOrder=False)
        quarantined = got.quarantined.where(got.quarantined[S.GROUP] == key).drop(S.GROUP)
        assertDataFrameEqual(quarantined, spark.createDataFrame(result.quarantined.to_arrow()), checkRowOrder=False)
        duplicates = got.duplicates.where(got.duplicates[S.GROUP] == key).select("batch_id", "duplicates")
        assertDataFrameEqual(duplicates, spark.createDataFrame(result.duplicates.to_arrow()), checkRowOrder=False)
        # Conservation, per partition, on Spark's side.
        rows_in = world[0][key].height
        assert rows_in == clean.count() + quarantined.count() + sum(r["duplicates"] for r in duplicates.collect())


def test_reason_categories_are_the_same_on_spark(spark, world) -> None:
    from recsys_assets.metadata import reason_category

    expected = pl.concat(r.quarantined for r in _polars(world).values()).select(reason_category().alias("category"))
    got = _spark(spark, world).quarantined.select(S.reason_category(S.F.col("reason")).alias("category"))
    assertDataFrameEqual(got, spark.createDataFrame(expected.to_arrow()), checkRowOrder=False)


def test_features_and_interactions_are_the_same_on_spark(spark, world) -> None:
    clean_pl = pl.concat(r.clean for r in _polars(world).values())
    clean_spark = _spark(spark, world).clean.drop(S.GROUP)
    expected_tracks = PF.track_features(clean_pl.lazy()).collect()
    expected_interactions = PF.training_interactions(clean_pl.lazy()).collect()
    assertDataFrameEqual(
        S.track_features(clean_spark), spark.createDataFrame(expected_tracks.to_arrow()), checkRowOrder=False, rtol=1e-9
    )
    assertDataFrameEqual(
        S.training_interactions(clean_spark),
        spark.createDataFrame(expected_interactions.to_arrow()),
        checkRowOrder=False,
        rtol=1e-9,
    )
    assert expected_interactions["liked"].any()
    assert expected_tracks.height > 100
