"""The split protocols on hand-made interactions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from recsys_assets.ml.split import SplitError, data_hash, global_temporal_split, per_user_temporal_split

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def frame(rows: list[tuple[str, str, int]]) -> pl.DataFrame:
    """(user, track, minutes after T0)."""
    return pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "track_id": [r[1] for r in rows],
            "played_at": [T0 + timedelta(minutes=r[2]) for r in rows],
            "weight": [1.0] * len(rows),
        }
    )


def test_global_cutoff_is_the_time_at_index_floor_0_9_n() -> None:
    rows = [("u", f"t{i}", i) for i in range(20)]  # n = 20: index 18 → minute 18
    split = global_temporal_split(frame(rows))
    assert split.cutoff == T0 + timedelta(minutes=18)
    assert split.train.height == 18
    assert split.holdout["track_id"].to_list() == ["t18", "t19"]


def test_global_split_keeps_ties_at_the_cutoff_together() -> None:
    rows = [("u", f"t{i}", min(i, 7)) for i in range(10)]  # index 9 → minute 7, shared by t7, t8, t9
    split = global_temporal_split(frame(rows))
    assert split.holdout["track_id"].sort().to_list() == ["t7", "t8", "t9"]
    assert (split.train["played_at"] < split.cutoff).all()


def test_duplicates_on_user_track_time_are_removed_before_splitting() -> None:
    rows = [("u", "t1", 1), ("u", "t1", 1), ("u", "t2", 2)]
    split = global_temporal_split(frame(rows))
    assert split.train.height + split.holdout.height == 2


def test_identical_timestamps_are_a_clear_error() -> None:
    with pytest.raises(SplitError, match="identical timestamps"):
        global_temporal_split(frame([("u", f"t{i}", 0) for i in range(10)]))


def test_empty_or_tiny_data_is_a_clear_error() -> None:
    with pytest.raises(SplitError, match="at least 2"):
        global_temporal_split(frame([("u", "t", 0)]))
    with pytest.raises(SplitError, match="no positive interactions"):
        per_user_temporal_split(frame([]))


def test_per_user_holds_out_the_latest_ceil_20_percent_of_eligible_users() -> None:
    heavy = [("a", f"t{i}", i) for i in range(6)]  # 6 → ceil(1.2) = 2 held out
    light = [("b", f"t{i}", i) for i in range(4)]  # 4 < 5: all train
    split = per_user_temporal_split(frame(heavy + light))
    assert split.holdout.sort("played_at").select("user_id", "track_id").rows() == [("a", "t4"), ("a", "t5")]
    assert split.train.filter(pl.col("user_id") == "b").height == 4


def test_per_user_ties_are_broken_by_track_id_as_strings() -> None:
    rows = [("a", "t10", 0), ("a", "t9", 0), ("a", "t2", 0), ("a", "t1", 0), ("a", "t3", 0)]
    split = per_user_temporal_split(frame(rows))  # n = 5 → 1 held out: the last by (time, track_id) = "t9"
    assert split.holdout["track_id"].to_list() == ["t9"]


def test_data_hash_ignores_row_order_but_not_content() -> None:
    df = frame([("u", "t1", 1), ("v", "t2", 2)])
    assert data_hash(df) == data_hash(df.reverse())
    assert data_hash(df) != data_hash(df.head(1))


def test_a_training_window_keeps_the_last_days_of_the_train_side() -> None:
    from recsys_assets.ml.split import recent

    day = 24 * 60
    train = frame([("u1", "a", 0), ("u1", "b", 2 * day), ("u2", "c", 2 * day - 1), ("u2", "d", 5 * day)])
    assert recent(train, 3)["track_id"].to_list() == ["b", "d"]  # from day 2 on (the last 3 days before day 5)
    assert recent(train, 0).equals(train)  # 0: all of it
    assert recent(train.clear(), 3).is_empty()
