"""Cleaning and normalisation of landed listening events (pure polars, no Dagster).

:func:`clean_events` takes a batch of landed events and the catalogue, and splits it into

- clean events: de-duplicated by ``event_id``, ids stripped, ``event_type`` lower-cased, timestamps
  in UTC, ``ms_played`` clipped to the track's duration, enriched with the catalogue (artist, genre,
  duration), flagged ``known_user`` / ``known_track`` (events of users or tracks that the catalogue
  does not know yet are kept: the catalogue often lags the event stream), and ``suspected_bot`` for
  users with implausible play rates;
- quarantined rows, each with the first contract rule it breaks, naming the field and the value;
- a count of duplicates per batch.

So that ``rows in = clean + quarantined + duplicates`` holds for every batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import polars as pl

from recsys_assets.data import rules as R
from recsys_assets.data.rules import EARLIEST, CleaningRules  # noqa: F401  (the rules' home is data.rules)
from recsys_core.contracts import QUARANTINE_SCHEMA, RAW_EVENTS_SCHEMA

CLEAN_EXTRA_SCHEMA: dict[str, pl.DataType] = {
    "genre": pl.String(),
    "completion": pl.Float64(),
    "ms_clipped": pl.Boolean(),
    "known_user": pl.Boolean(),
    "known_track": pl.Boolean(),
    "suspected_bot": pl.Boolean(),
}
CLEAN_SCHEMA = {**RAW_EVENTS_SCHEMA, **CLEAN_EXTRA_SCHEMA}


@dataclass(frozen=True)
class CleanResult:
    clean: pl.DataFrame
    quarantined: pl.DataFrame  # QUARANTINE_SCHEMA
    duplicates: pl.DataFrame  # batch_id, duplicates

    def stats(self) -> dict[str, int]:
        return {
            "clean": self.clean.height,
            "quarantined": self.quarantined.height,
            "duplicates": int(self.duplicates["duplicates"].sum()) if self.duplicates.height else 0,
        }


def _shown(col: str) -> pl.Expr:
    """A value as a reason shows it (``rules.SHOWN_LIMIT``)."""
    text = pl.col(col).cast(pl.String).fill_null(R.NULL_SHOWN)
    return (
        pl.when(text.str.len_chars() > R.SHOWN_LIMIT)
        .then(text.str.slice(0, R.SHOWN_LIMIT) + R.SHOWN_ELLIPSIS)
        .otherwise(text)
    )


def _broken(rule: R.ContractRule) -> pl.Expr:
    col = pl.col(rule.field)
    match rule.test:
        case "empty":
            return col.is_null() | (col == "")
        case "missing":
            return col.is_null()
        case "not_in":
            return col.is_null() | ~col.is_in(rule.bound)
        case "present_not_in":
            return col.is_not_null() & ~col.is_in(rule.bound)
        case "below":
            return col < rule.bound
        case "above":
            return col > rule.bound
        case "at_most":
            return col <= rule.bound
    raise ValueError(f"unknown test {rule.test!r}")


def _reason(rule: R.ContractRule) -> pl.Expr:
    before, after = rule.reason_parts()
    if after is None:
        return pl.lit(before)
    shown = (
        pl.col(rule.field).dt.to_string("%Y-%m-%dT%H:%M:%S%.fZ") if rule.field == "played_at" else _shown(rule.field)
    )
    return pl.lit(before) + shown + pl.lit(after)


def contract_rules(now: datetime, rules: CleaningRules) -> list[tuple[pl.Expr, pl.Expr]]:
    """The contract's rules (``rules.contract_rules``) in polars: (broken?, reason naming the field and the value)."""
    return [(_broken(rule), _reason(rule)) for rule in R.contract_rules(now, rules)]


def _first_broken_rule(checks: list[tuple[pl.Expr, pl.Expr]]) -> pl.Expr:
    """The index of the first rule each row breaks (null if none): a small integer per row, so the
    messages are only ever formatted for the rows that break a rule."""
    expr = pl.when(checks[0][0].fill_null(False)).then(pl.lit(0, pl.Int8))
    for i, (broken, _) in enumerate(checks[1:], start=1):
        expr = expr.when(broken.fill_null(False)).then(pl.lit(i, pl.Int8))
    return expr.otherwise(pl.lit(None, pl.Int8))


def clean_events(
    raw: pl.DataFrame | pl.LazyFrame,
    tracks: pl.DataFrame,
    users: pl.DataFrame,
    *,
    now: datetime,
    origin: str,
    rules: CleaningRules | None = None,
) -> CleanResult:
    """Clean one set of landed events; see the module docstring.

    The whole cleaning is one lazy polars plan, collected once (clean rows, quarantine and duplicate
    counts together), so intermediate copies of the batch are never all alive at once.

    Args:
        raw: landed events (``RAW_EVENTS_SCHEMA``, with ``batch_id``).
        tracks: the ``tracks`` catalogue.
        users: the ``users`` catalogue.
        now: the reference time of the "in the future" rule.
        origin: recorded on quarantined rows (the raw file they came from).
        rules: thresholds.
    """
    rules = rules or CleaningRules()
    checks = contract_rules(now, rules)
    normalised = raw.lazy().with_columns(
        pl.col("event_id", "user_id", "track_id", "artist_id").str.strip_chars(R.WHITESPACE),
        pl.col("event_type").str.strip_chars(R.WHITESPACE).str.to_lowercase(),
        pl.col("source").str.strip_chars(R.WHITESPACE).str.to_lowercase().fill_null("organic"),
        pl.col("played_at").dt.convert_time_zone("UTC"),
    )
    # A repeated event_id is a duplicate of its first occurrence, across the whole input.
    normalised = normalised.with_columns(pl.col("event_id").is_first_distinct().alias("_first"))
    duplicates = (
        normalised.group_by("batch_id")
        .agg((~pl.col("_first")).sum().cast(pl.Int64).alias("duplicates"))
        .filter(pl.col("duplicates") > 0)
        .sort("batch_id")
    )
    checked = normalised.filter(pl.col("_first")).drop("_first").with_columns(_first_broken_rule(checks).alias("_rule"))
    bad = checked.filter(pl.col("_rule").is_not_null())
    catalogue = tracks.lazy().select(
        "track_id",
        pl.col("artist_id").alias("_cat_artist"),
        pl.col("genre"),
        pl.col("duration_ms").alias("_cat_duration"),
    )
    enriched = (
        checked.filter(pl.col("_rule").is_null())
        .drop("_rule")
        .join(catalogue, on="track_id", how="left", maintain_order="left")
        .with_columns(
            (pl.col("_cat_duration").is_not_null() | pl.col("_cat_artist").is_not_null()).alias("known_track"),
            pl.col("user_id").is_in(users["user_id"].implode()).alias("known_user"),
            pl.coalesce("artist_id", "_cat_artist").alias("artist_id"),
            pl.coalesce("track_duration_ms", "_cat_duration").alias("track_duration_ms"),
            pl.col("genre").fill_null("unknown"),
        )
        .with_columns(
            (pl.col("ms_played") > pl.col("track_duration_ms")).fill_null(False).alias("ms_clipped"),
            pl.when(pl.col("ms_played") > pl.col("track_duration_ms"))
            .then(pl.col("track_duration_ms"))
            .otherwise(pl.col("ms_played"))
            .alias("ms_played"),
        )
        .with_columns(
            pl.when(pl.col("track_duration_ms") > 0)
            .then(pl.col("ms_played") / pl.col("track_duration_ms"))
            .alias("completion")
        )
        .drop("_cat_artist", "_cat_duration")
    )
    # A user is a suspected bot if any clock hour of theirs has too many plays or skips. Only
    # listening with a known ms_played counts: a burst of MovieLens ratings is not a bot.
    bots = (
        enriched.filter(pl.col("event_type").is_in(("play", "skip")) & pl.col("ms_played").is_not_null())
        .group_by("user_id", pl.col("played_at").dt.truncate("1h"))
        .len()
        .filter(pl.col("len") > rules.bot_plays_per_hour)
        .select("user_id")
        .unique()
    )
    clean, bad_df, duplicates_df, bots_df = pl.collect_all([enriched, bad, duplicates, bots])
    clean = clean.with_columns(pl.col("user_id").is_in(bots_df["user_id"].implode()).alias("suspected_bot")).select(
        list(CLEAN_SCHEMA)
    )
    # The messages are formatted on the (few) rejected rows only.
    reason = pl.coalesce([pl.when(pl.col("_rule") == i).then(message) for i, (_, message) in enumerate(checks)])
    quarantined = bad_df.select(
        pl.col("batch_id"),
        pl.lit("cleaning").alias("stage"),
        pl.lit(origin).alias("origin"),
        pl.lit(None, pl.Int64).alias("line_number"),
        pl.col("event_id"),
        reason.alias("reason"),
        pl.struct(pl.all().exclude("_rule", *R.ORIGINAL_EXCLUDED)).struct.json_encode().alias("original"),
    ).cast(QUARANTINE_SCHEMA)
    return CleanResult(clean=clean, quarantined=quarantined, duplicates=duplicates_df)
