"""Evidently drift on constructed windows."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recsys_assets.ml.drift import run_drift

pytestmark = pytest.mark.slow


def window(n: int, genre_mix: list[float], activity: float, skip: float, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "genre": rng.choice(["pop", "rock", "jazz"], n, p=genre_mix),
            "user_activity": rng.poisson(activity, n).astype(float),
            "track_popularity": rng.uniform(0, 1, n),
            "ms_played": rng.normal(180_000, 30_000, n),
            "is_skip": rng.choice(["0", "1"], n, p=[1 - skip, skip]),
        }
    )


def test_a_shifted_window_drifts_and_the_same_one_does_not(tmp_path) -> None:
    reference = window(3000, [0.5, 0.3, 0.2], 40, 0.2, seed=1)
    same = window(3000, [0.5, 0.3, 0.2], 40, 0.2, seed=2)
    shifted = window(3000, [0.1, 0.2, 0.7], 80, 0.5, seed=3)
    calm = run_drift(reference, same, drift_share=0.5, html_path=tmp_path / "calm.html")
    assert not calm.drifted
    assert calm.drift_share < 0.5
    drifted = run_drift(reference, shifted, drift_share=0.5, html_path=tmp_path / "drift.html")
    assert drifted.drifted
    assert set(drifted.columns.filter(pl.col("drifted"))["column"]) >= {"genre", "user_activity", "is_skip"}
    assert (tmp_path / "drift.html").stat().st_size > 100_000


def test_an_empty_window_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="0 current rows: a window is empty"):
        run_drift(window(10, [1, 0, 0], 1, 0, 1), window(10, [1, 0, 0], 1, 0, 1).head(0), 0.5, tmp_path / "x.html")


def test_the_reference_holds_as_many_events_as_the_current_window() -> None:
    """A stream faster than the history must not read as drift: the windows match in events, not days."""
    from datetime import UTC, datetime, timedelta

    from recsys_assets.ml.drift import current_window, reference_window

    start = datetime(2026, 1, 1, tzinfo=UTC)
    # History: one event an hour for 10 days; then a stream ten times faster for a day.
    history = [start + timedelta(hours=h) for h in range(240)]
    stream = [start + timedelta(days=10, minutes=6 * i) for i in range(1, 241)]
    events = pl.DataFrame(
        {
            "user_id": "u1",
            "track_id": "t1",
            "genre": "pop",
            "ms_played": 1000,
            "event_type": ["play", "skip", "like"] * 160,
            "source": ["organic"] * 478 + ["recommendation", "organic"],  # a skip of a recommendation
            "played_at": history + stream,
        }
    ).lazy()
    champion_end = history[-1]
    current = current_window(events, latest=stream[-1], days=0.5).collect()
    assert stream[-2] not in current["played_at"]  # feedback on our recommendations is not compared
    assert stream[-3] in current["played_at"]
    assert current["played_at"].min() > stream[-1] - timedelta(days=0.5)
    assert set(current["event_type"]) == {"play", "skip"}
    reference = reference_window(events, champion_end, current.height).collect()
    assert reference.height == current.height
    assert champion_end - timedelta(hours=2) <= reference["played_at"].max() <= champion_end  # the last is a like
    # Half a day of the stream is 80 listening events; in the history they span more than 4 days.
    assert reference["played_at"].min() < champion_end - timedelta(days=4)
