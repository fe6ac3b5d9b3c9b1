"""Cleaning rules on tiny inline frames: every rejected row has a reason, nothing is lost."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from recsys_assets.data.cleaning import CLEAN_EXTRA_SCHEMA, CleaningRules, clean_events
from recsys_core.contracts import RAW_EVENTS_SCHEMA, TRACKS_SCHEMA, USERS_SCHEMA, conform

NOW = datetime(2026, 6, 1, tzinfo=UTC)
TRACKS = conform(
    pl.DataFrame(
        {
            "track_id": ["t1", "t2"],
            "artist_id": ["a1", "a2"],
            "genre": ["rock", "jazz"],
            "duration_ms": [200_000, 100_000],
        }
    ),
    TRACKS_SCHEMA,
)
USERS = conform(pl.DataFrame({"user_id": ["u1"]}), USERS_SCHEMA)


def raw(**overrides) -> pl.DataFrame:
    row = {
        "event_id": "e1",
        "user_id": "u1",
        "track_id": "t1",
        "played_at": NOW - timedelta(days=1),
        "ms_played": 150_000,
        "event_type": "play",
        "source": "organic",
        "batch_id": 1,
    }
    row.update(overrides)
    return conform(pl.DataFrame([row]), RAW_EVENTS_SCHEMA)


def clean(df: pl.DataFrame, **kw):
    return clean_events(df, TRACKS, USERS, now=NOW, origin="file.parquet", **kw)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"user_id": None}, "user_id is empty"),
        ({"track_id": "  "}, "track_id is empty"),
        ({"event_type": "listen"}, "event_type=listen: not one of play, skip, like, dislike, impression, click"),
        ({"source": "radio"}, "source=radio: not one of organic, recommendation"),
        ({"ms_played": -5}, "ms_played=-5: negative"),
        ({"ms_played": 90_000_000}, "ms_played=90000000: absurd (more than 86,400,000 ms)"),
        ({"played_at": datetime(1999, 12, 31, tzinfo=UTC)}, "played_at=1999-12-31T00:00:00Z: before 2000-01-01"),
        (
            {"played_at": NOW + timedelta(days=2)},
            "played_at=2026-06-03T00:00:00Z: in the future (now is 2026-06-01T00:00:00Z)",
        ),
        ({"track_duration_ms": 0}, "track_duration_ms=0: not positive"),
    ],
)
def test_each_rule_quarantines_with_the_field_and_the_value(overrides: dict, reason: str) -> None:
    result = clean(raw(**overrides))
    assert result.clean.height == 0
    assert result.quarantined["reason"].to_list() == [reason]
    assert result.quarantined["stage"].to_list() == ["cleaning"]
    assert result.quarantined["batch_id"].to_list() == [1]
    assert result.quarantined["origin"].to_list() == ["file.parquet"]
    assert '"event_id":"e1"' in result.quarantined["original"][0]


def test_valid_rows_are_normalised_and_enriched() -> None:
    df = pl.concat(
        [raw(event_type=" PLAY ", ms_played=250_000), raw(event_id="e2", track_id="t9", user_id="u7", source=None)]
    )
    result = clean(df)
    assert result.quarantined.height == 0
    rows = {r["event_id"]: r for r in result.clean.iter_rows(named=True)}
    assert rows["e1"]["event_type"] == "play"
    assert rows["e1"]["ms_played"] == 200_000  # clipped to the catalogue's duration
    assert rows["e1"]["ms_clipped"] is True
    assert rows["e1"]["completion"] == 1.0
    assert (rows["e1"]["artist_id"], rows["e1"]["genre"]) == ("a1", "rock")
    assert (rows["e1"]["known_user"], rows["e1"]["known_track"]) == (True, True)
    assert (rows["e2"]["known_user"], rows["e2"]["known_track"], rows["e2"]["genre"]) == (False, False, "unknown")
    assert rows["e2"]["source"] == "organic"
    assert set(CLEAN_EXTRA_SCHEMA) <= set(result.clean.columns)


def test_duplicates_are_counted_per_batch_and_conservation_holds() -> None:
    df = pl.concat(
        [raw(), raw(), raw(event_id="e2", batch_id=2), raw(event_id="e3", batch_id=2, ms_played=-1), raw(batch_id=3)]
    )
    result = clean(df)
    assert result.duplicates.rows() == [(1, 1), (3, 1)]  # e1 again in batch 1, and again in batch 3
    stats = result.stats()
    assert stats == {"clean": 2, "quarantined": 1, "duplicates": 2}
    assert df.height == sum(stats.values())


def test_bot_like_play_rates_are_flagged_not_dropped() -> None:
    start = NOW - timedelta(hours=3)
    bot = [
        raw(event_id=f"b{i}", user_id="bot", played_at=start + timedelta(seconds=10 * i), ms_played=9_000)
        for i in range(200)
    ]
    human = [raw(event_id=f"h{i}", played_at=start + timedelta(minutes=4 * i)) for i in range(10)]
    result = clean(pl.concat(bot + human), rules=CleaningRules(bot_plays_per_hour=180))
    flagged = result.clean.group_by("user_id").agg(pl.col("suspected_bot").all()).sort("user_id")
    assert flagged.rows() == [("bot", True), ("u1", False)]
    assert result.clean.height == 210


def test_missing_ms_played_stays_unknown() -> None:
    result = clean(raw(ms_played=None))
    assert result.clean["ms_played"].to_list() == [None]
    assert result.clean["completion"].to_list() == [None]


def test_rating_bursts_without_ms_played_are_not_bots() -> None:
    start = NOW - timedelta(hours=3)
    burst = [raw(event_id=f"r{i}", played_at=start + timedelta(seconds=5 * i), ms_played=None) for i in range(300)]
    result = clean(pl.concat(burst))
    assert not result.clean["suspected_bot"].any()
