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
