"""Listening histories: for each positive interaction, the user's last ``n`` positive tracks strictly
before it: the history-aware query tower's input at training time (``recsys_assets.ml.two_tower``).
Serving builds the same input at request time (``recsys_core.scoring``).

Vectorised polars, no Python loop per event: the interactions are sorted by user and time, and the
``k``-th previous track is the ``k``-th shift within the user (``shift(k).over(user)``); a previous
interaction at the *same* instant is not history (it is not before), so it is masked by its own
shifted timestamp. Memory: ``n`` integer columns per interaction (``n`` = 50: 200 bytes a row at 32
bits, 200 MB per million interactions), built once per training.
"""

from __future__ import annotations

import polars as pl

DEFAULT_LENGTH = 50


def histories(
    interactions: pl.DataFrame,
    track_index: pl.DataFrame,
    n: int = DEFAULT_LENGTH,
    *,
    user: str = "user_id",
    track: str = "track_id",
    at: str = "played_at",
) -> pl.DataFrame:
    """``interactions`` with ``history``: a list of up to ``n`` track rows, most recent first, of the
    user's positives strictly before each row's ``at`` (0-padded to ``n``), and ``history_length``.

    Args:
        interactions: one row per positive interaction (``user``, ``track``, ``at``, …).
        track_index: ``track`` → ``row`` (the model's item rows; row 0 is out of vocabulary and padding).
    """
    ordered = (
        interactions.join(track_index.select(track, pl.col("row").cast(pl.Int32)), on=track, how="left")
        .with_columns(pl.col("row").fill_null(0))
        .sort(user, at, track)
    )
    previous = [
        pl.when(pl.col(at).shift(k).over(user) < pl.col(at))
        .then(pl.col("row").shift(k).over(user))
        .otherwise(None)
        .alias(f"_h{k}")
        for k in range(1, n + 1)
    ]
    shifted = ordered.with_columns(previous)
    columns = [f"_h{k}" for k in range(1, n + 1)]
    # Same-instant rows are masked one by one above; what is left are strictly earlier plays, most
    # recent first, with nulls where the user has fewer (or same-instant ones): dropped, then padded.
    return (
        shifted.with_columns(pl.concat_list(columns).list.drop_nulls().alias("_history"))
        .with_columns(
            pl.col("_history").list.len().alias("history_length"),
            pl.concat_list(pl.col("_history"), pl.lit(0, pl.Int32).repeat_by(n - pl.col("_history").list.len())).alias(
                "history"
            ),
        )
        .drop(*columns, "_history")
    )
