"""Listening histories see only what came strictly before (no leakage), built without a Python loop."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl

from recsys_assets.ml.history import histories

T0 = datetime(2026, 1, 1)


def test_histories_by_hand() -> None:
    plays = pl.DataFrame(
        {
            "user_id": ["a", "a", "a", "a", "b"],
            "track_id": ["t1", "t2", "t3", "t4", "t2"],
            "played_at": [T0, T0 + timedelta(minutes=1), T0 + timedelta(minutes=1), T0 + timedelta(minutes=2),
                          T0 - timedelta(hours=1)],
        }
    )  # fmt: skip
    index = pl.DataFrame({"track_id": ["t1", "t2", "t3", "t4"], "row": [1, 2, 3, 4]})
    got = histories(plays, index, n=3).sort("user_id", "played_at", "track_id")
    assert got.select("user_id", "track_id", "history", "history_length").rows() == [
        ("a", "t1", [0, 0, 0], 0),
        ("a", "t2", [1, 0, 0], 1),
        ("a", "t3", [1, 0, 0], 1),  # t2 was played at the same instant: not before
        ("a", "t4", [3, 2, 1], 3),  # most recent first
        ("b", "t2", [0, 0, 0], 0),  # another user's plays are not history
    ]


def test_no_history_item_is_from_the_row_s_instant_or_later() -> None:
    rng = np.random.default_rng(0)
    n_rows = 5_000
    plays = pl.DataFrame(
        {
            "user_id": rng.integers(0, 50, n_rows).astype(str),
            "track_id": rng.integers(1, 300, n_rows).astype(str),
            "played_at": [T0 + timedelta(minutes=int(m)) for m in rng.integers(0, 2_000, n_rows)],
        }
    )
    index = pl.DataFrame({"track_id": [str(i) for i in range(1, 300)], "row": list(range(1, 300))})
    got = histories(plays, index, n=20)
    # The spec, one row at a time: of the user's 20 plays just before this one (ordered by time, then
    # track), those strictly earlier, most recent first, 0-padded.
    for _, rows in got.sort("user_id", "played_at", "track_id").group_by("user_id", maintain_order=True):
        played = list(zip(rows["played_at"].to_list(), rows["track_id"].cast(pl.Int32).to_list(), strict=True))
        for i, (history, length) in enumerate(rows.select("history", "history_length").iter_rows()):
            when = played[i][0]
            expected = [track for at, track in reversed(played[max(0, i - 20) : i]) if at < when]
            assert history == expected + [0] * (20 - len(expected))
            assert length == len(expected)


def test_with_ties_the_plays_of_the_same_instant_are_history_in_an_order_unrelated_to_the_id() -> None:
    """Day-granular timestamps: with ``ties`` the plays of the row's own day that sort before it are its
    history, never the row itself or a later day's; inside a day the order is a hash of the track, so a
    target's same-day history is not the lower ids (a per-user holdout that breaks ties by id would
    otherwise reward a model that learned "a higher id comes next")."""
    from recsys_assets.ml.history import history_matrix

    rng = np.random.default_rng(1)
    n_rows = 4_000
    plays = pl.DataFrame(
        {
            "user_id": rng.integers(0, 40, n_rows).astype(str),
            "track_id": rng.integers(1, 300, n_rows).astype(str),
            "played_at": [T0 + timedelta(days=int(d)) for d in rng.integers(0, 10, n_rows)],
        }
    ).unique(["user_id", "track_id"])
    index = pl.DataFrame({"track_id": [str(i) for i in range(1, 300)], "row": list(range(1, 300))})
    strict = history_matrix(plays, index, n=20)[1]
    ordered, matrix, lengths = history_matrix(plays, index, n=20, ties=True)
    assert lengths.sum() > (strict > 0).sum()  # the same day's plays are added
    lower = same_day = 0
    for _, rows in ordered.with_row_index("i").group_by("user_id", maintain_order=True):
        played = list(zip(rows["played_at"].to_list(), rows["row"].to_list(), strict=True))
        for j, i in enumerate(rows["i"].to_list()):
            when, target = played[j]
            expected = [row for _, row in reversed(played[max(0, j - 20) : j])]  # the rows just before, any instant
            assert matrix[i].tolist() == expected + [0] * (20 - len(expected))
            assert target not in expected
            assert all(at <= when for at, _ in played[:j])
            today = [row for at, row in played[max(0, j - 20) : j] if at == when]
            same_day += len(today)
            lower += sum(row < target for row in today)
    assert same_day > 1_000
    assert 0.4 < lower / same_day < 0.6  # by id it would be 1.0
