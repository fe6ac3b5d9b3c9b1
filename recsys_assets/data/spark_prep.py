"""The preparation on Apache Spark: the rules of ``data.rules`` as PySpark DataFrame functions.

The Spark twin of ``data.cleaning`` and ``data.features``, for data that outgrows one machine: the same
columns and types, the same quarantine reasons, ``rows in = clean + quarantined + duplicates`` per
partition. Every function is pure, DataFrame in, DataFrame out, with no Dagster and no Python UDF
(so executors never start a Python worker). ``recsys_assets_tests/data/test_spark_parity.py`` holds it
to the polars version on generated data with every malformed case.

Many partitions are cleaned in one Spark application: the raw rows carry their partition (``group``)
and their position in the partition's file (``order``); duplicates and bots are judged within a
partition, as polars does when it cleans one file at a time.

The session must run in UTC (``spark.sql.session.timeZone``): hours and formatted timestamps are UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import polars as pl
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys_assets.data import rules as R
from recsys_assets.data.cleaning import CLEAN_EXTRA_SCHEMA
from recsys_assets.data.features import INTERACTIONS_SCHEMA, TRACK_FEATURES_SCHEMA
from recsys_core.contracts import QUARANTINE_SCHEMA, RAW_EVENTS_SCHEMA

CLEAN_SCHEMA = {**RAW_EVENTS_SCHEMA, **CLEAN_EXTRA_SCHEMA}
# Columns the caller adds to the raw rows: the partition, the row's position in its file, its file.
GROUP, ORDER, ORIGIN = "_partition", "_row", "_origin"
HELPERS = (GROUP, ORDER, ORIGIN)


def spark_type(dtype: pl.DataType) -> T.DataType:
    """The Spark type of a contract column (the contracts are written once, as polars schemas)."""
    if isinstance(dtype, pl.Datetime):
        return T.TimestampType()
    for polars_type, spark in (
        (pl.String, T.StringType()),
        (pl.Int64, T.LongType()),
        (pl.Float64, T.DoubleType()),
        (pl.Boolean, T.BooleanType()),
        (pl.Date, T.DateType()),
    ):
        if dtype == polars_type:
            return spark
    raise TypeError(f"no Spark type for {dtype}")


def spark_schema(schema: dict[str, pl.DataType]) -> T.StructType:
    return T.StructType([T.StructField(name, spark_type(dtype)) for name, dtype in schema.items()])


def conform(df: DataFrame, schema: dict[str, pl.DataType]) -> DataFrame:
    """``df`` with exactly the columns of ``schema``, in its order and of its types."""
    return df.select(*[F.col(name).cast(spark_type(dtype)).alias(name) for name, dtype in schema.items()])


@dataclass(frozen=True)
class SparkCleanResult:
    clean: DataFrame  # CLEAN_SCHEMA, plus the group column
    quarantined: DataFrame  # QUARANTINE_SCHEMA, plus the group column
    duplicates: DataFrame  # group, batch_id, duplicates (> 0)
    # The normalised rows the three come from, persisted when ``clean_events(persist=True)``.
    normalised: DataFrame

    def release(self) -> None:
        """Drop the persisted rows (a no-op without ``persist``)."""
        self.normalised.unpersist()


def _timestamp_text(col: Column, zone: str) -> Column:
    """A timestamp as ``rules`` shows it: seconds, then 0, 3 or 6 fractional digits, then ``zone``."""
    micros = F.pmod(F.unix_micros(col), F.lit(1_000_000))
    fraction = (
        F.when(micros == 0, F.lit(""))
        .when(micros % 1000 == 0, F.concat(F.lit("."), F.lpad((micros / 1000).cast("long").cast("string"), 3, "0")))
        .otherwise(F.concat(F.lit("."), F.lpad(micros.cast("string"), 6, "0")))
    )
    return F.concat(F.date_format(col, "yyyy-MM-dd'T'HH:mm:ss"), fraction, F.lit(zone))


def _shown(field: str, dtype: pl.DataType) -> Column:
    if isinstance(dtype, pl.Datetime):
        return _timestamp_text(F.col(field), "Z")
    text = F.coalesce(F.col(field).cast("string"), F.lit(R.NULL_SHOWN))
    return F.when(
        F.char_length(text) > R.SHOWN_LIMIT, F.concat(F.substring(text, 1, R.SHOWN_LIMIT), F.lit(R.SHOWN_ELLIPSIS))
    ).otherwise(text)


def _broken(rule: R.ContractRule) -> Column:
    col = F.col(rule.field)
    match rule.test:
        case "empty":
            broken = col.isNull() | (col == "")
        case "missing":
            broken = col.isNull()
        case "not_in":
            broken = col.isNull() | ~col.isin(list(rule.bound))
        case "present_not_in":
            broken = col.isNotNull() & ~col.isin(list(rule.bound))
        case "below":
            broken = col < F.lit(rule.bound)
        case "above":
            broken = col > F.lit(rule.bound)
        case "at_most":
            broken = col <= F.lit(rule.bound)
        case _:
            raise ValueError(f"unknown test {rule.test!r}")
    return F.coalesce(broken, F.lit(False))


def _reason(rule: R.ContractRule) -> Column:
    before, after = rule.reason_parts()
    if after is None:
        return F.lit(before)
    return F.concat(F.lit(before), _shown(rule.field, RAW_EVENTS_SCHEMA[rule.field]), F.lit(after))


def _strip(col: str) -> Column:
    return F.trim(F.col(col), F.lit(R.WHITESPACE))


def reason_category(reason: Column) -> Column:
    """``metadata.reason_category`` in Spark: the reason without its value, numbers written N."""
    return F.regexp_replace(F.regexp_replace(reason, R.REASON_VALUE_PATTERN, "$1: "), R.REASON_NUMBER_PATTERN, "N")


def clean_events(
    raw: DataFrame,
    tracks: DataFrame,
    users: DataFrame,
    *,
    now: datetime,
    rules: R.CleaningRules | None = None,
    persist: bool = False,
) -> SparkCleanResult:
    """Clean landed events of one or more partitions; see ``data.cleaning.clean_events``.

    Args:
        raw: landed events (``RAW_EVENTS_SCHEMA``) with ``_partition`` (the partition key), ``_row``
            (the row's position in its partition's file) and ``_origin`` (recorded on quarantined rows).
        tracks: the ``tracks`` catalogue.
        users: the ``users`` catalogue.
        now: the reference time of the "in the future" rule.
        rules: thresholds.
        persist: keep the normalised rows (memory, then local disk) once computed, so that writing
            the clean rows, the quarantine and the counts reads and sorts the input once, not three
            times; call ``release()`` when done.
    """
    rules = rules or R.CleaningRules()
    checks = R.contract_rules(now, rules)
    normalised = raw.withColumns(
        {
            **{c: _strip(c) for c in ("event_id", "user_id", "track_id", "artist_id")},
            "event_type": F.lower(_strip("event_type")),
            "source": F.coalesce(F.lower(_strip("source")), F.lit("organic")),
        }
    )
    # A repeated event_id is a duplicate of its first occurrence in the partition.
    first = Window.partitionBy(GROUP, "event_id").orderBy(ORDER)
    normalised = normalised.withColumn("_first", F.row_number().over(first) == 1)
    if persist:
        normalised = normalised.persist(StorageLevel.MEMORY_AND_DISK)
    duplicates = (
        normalised.where(~F.col("_first")).groupBy(GROUP, "batch_id").agg(F.count(F.lit(1)).alias("duplicates"))
    )
    rule_index = F.lit(None).cast("int")
    for i, rule in reversed(list(enumerate(checks))):
        rule_index = F.when(_broken(rule), F.lit(i)).otherwise(rule_index)
    checked = normalised.where(F.col("_first")).drop("_first").withColumn("_rule", rule_index)

    reason = F.lit(None).cast("string")
    for i, rule in enumerate(checks):
        reason = F.when(F.col("_rule") == i, _reason(rule)).otherwise(reason)
    original_columns = [c for c in RAW_EVENTS_SCHEMA if c not in R.ORIGINAL_EXCLUDED]
    original = F.to_json(
        F.struct(
            *[
                _timestamp_text(F.col(c), "+00:00").alias(c)
                if isinstance(RAW_EVENTS_SCHEMA[c], pl.Datetime)
                else F.col(c)
                for c in original_columns
            ]
        ),
        {"ignoreNullFields": "false"},
    )
    quarantined = checked.where(F.col("_rule").isNotNull()).select(
        F.col(GROUP),
        F.col("batch_id"),
        F.lit("cleaning").alias("stage"),
        F.col(ORIGIN).alias("origin"),
        F.lit(None).cast("long").alias("line_number"),
        F.col("event_id"),
        reason.alias("reason"),
        original.alias("original"),
    )

    catalogue = tracks.select(
        "track_id",
        F.col("artist_id").alias("_cat_artist"),
        "genre",
        F.col("duration_ms").alias("_cat_duration"),
    )
    known_users = users.select("user_id", F.lit(True).alias("_known_user")).dropDuplicates(["user_id"])
    duration = F.col("track_duration_ms")
    enriched = (
        checked.where(F.col("_rule").isNull())
        .drop("_rule")
        .join(F.broadcast(catalogue), on="track_id", how="left")
        .join(F.broadcast(known_users), on="user_id", how="left")
        .withColumns(
            {
                "known_track": F.col("_cat_duration").isNotNull() | F.col("_cat_artist").isNotNull(),
                "known_user": F.coalesce(F.col("_known_user"), F.lit(False)),
                "artist_id": F.coalesce("artist_id", "_cat_artist"),
                "track_duration_ms": F.coalesce("track_duration_ms", "_cat_duration"),
                "genre": F.coalesce("genre", F.lit("unknown")),
            }
        )
        .withColumns(
            {
                "ms_clipped": F.coalesce(F.col("ms_played") > duration, F.lit(False)),
                "ms_played": F.when(F.col("ms_played") > duration, duration).otherwise(F.col("ms_played")),
            }
        )
        .withColumn("completion", F.when(duration > 0, F.col("ms_played") / duration))
    )
    bots = (
        enriched.where(F.col("event_type").isin(list(R.BOT_EVENT_TYPES)) & F.col("ms_played").isNotNull())
        .groupBy(GROUP, "user_id", F.date_trunc("hour", "played_at"))
        .count()
        .where(F.col("count") > rules.bot_plays_per_hour)
        .select(GROUP, "user_id", F.lit(True).alias("_bot"))
        .dropDuplicates([GROUP, "user_id"])
    )
    # Suspected bots are few: broadcast them, rather than shuffle every clean row to join them.
    clean = enriched.join(F.broadcast(bots), on=[GROUP, "user_id"], how="left").withColumn(
        "suspected_bot", F.coalesce(F.col("_bot"), F.lit(False))
    )
    return SparkCleanResult(
        clean=conform(clean, {**CLEAN_SCHEMA, GROUP: pl.String()}),
        quarantined=conform(quarantined, {**QUARANTINE_SCHEMA, GROUP: pl.String()}),
        duplicates=duplicates,
        normalised=normalised,
    )


def is_positive() -> Column:
    """``features.is_positive`` in Spark."""
    return F.col("event_type").isin(list(R.POSITIVES)) & ~F.col("suspected_bot")


def track_features(clean: DataFrame) -> DataFrame:
    """``features.track_features`` in Spark: one row per track, with its artist's."""
    play = F.col("event_type") == "play"
    skip = F.col("event_type") == "skip"

    def count(condition: Column) -> Column:
        return F.sum(condition.cast("long"))

    tracks = clean.groupBy("track_id").agg(
        F.min("artist_id").alias("artist_id"),
        F.min("genre").alias("genre"),
        count(play).alias("plays"),
        count(skip).alias("skips"),
        count(F.col("event_type") == "like").alias("likes"),
        F.count_distinct(F.when(play, F.col("user_id"))).alias("listeners"),
        (count(skip) / F.greatest(count(play | skip), F.lit(1))).alias("skip_rate"),
        F.avg(F.when(play | skip, F.col("completion"))).alias("completion_mean"),
        F.max("played_at").alias("last_played_at"),
        F.bool_and("known_track").alias("known_track"),
    )
    artists = (
        clean.where(F.col("artist_id").isNotNull())
        .groupBy("artist_id")
        .agg(
            count(play).alias("artist_plays"),
            F.count_distinct(F.when(play, F.col("user_id"))).alias("artist_listeners"),
        )
    )
    # The average rank of each play count (ties share it), from the counts of tracks per play count:
    # the number of distinct play counts is small, so this stays a small job however many tracks.
    ties = tracks.groupBy("plays").agg(F.count(F.lit(1)).alias("_ties"))
    below = F.coalesce(
        F.sum("_ties").over(Window.orderBy("plays").rowsBetween(Window.unboundedPreceding, -1)), F.lit(0)
    )
    ranks = ties.select("plays", (below + (F.col("_ties") + 1) / 2).alias("_rank"))
    totals = tracks.agg(F.sum("plays").alias("_total"), F.count(F.lit(1)).alias("_n"))
    features = (
        tracks.join(artists, on="artist_id", how="left")
        .join(F.broadcast(ranks), on="plays", how="left")
        .crossJoin(F.broadcast(totals))
        .withColumns(
            {
                "popularity": F.col("plays") / F.greatest(F.col("_total"), F.lit(1)),
                "popularity_rank": (F.col("_rank") - 1) / F.greatest(F.col("_n") - 1, F.lit(1)),
            }
        )
    )
    return conform(features, TRACK_FEATURES_SCHEMA).orderBy("track_id")


def training_interactions(clean: DataFrame) -> DataFrame:
    """``features.training_interactions`` in Spark: positives, one per (user, track, instant), weighted."""
    weight = F.when(F.col("event_type") == "like", F.lit(R.LIKE_WEIGHT)).otherwise(
        F.least(F.greatest(F.coalesce(F.col("completion"), F.lit(1.0)), F.lit(0.0)), F.lit(1.0))
    )
    interactions = (
        clean.where(is_positive())
        .select(
            "user_id",
            "track_id",
            "played_at",
            weight.alias("weight"),
            (F.col("event_type") == "like").alias("liked"),
            (F.col("source") != "recommendation").alias("organic"),
        )
        .groupBy("user_id", "track_id", "played_at")
        .agg(F.sum("weight").alias("weight"), F.bool_or("liked").alias("liked"), F.bool_and("organic").alias("organic"))
    )
    return conform(interactions, INTERACTIONS_SCHEMA)
