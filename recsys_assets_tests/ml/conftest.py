"""Tiny simulated interactions for the model tests (seconds, not minutes)."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest

from recsys_assets.data import features as F
from recsys_assets.data.cleaning import clean_events
from recsys_core.contracts import RAW_EVENTS_SCHEMA, conform
from recsys_sim.simulator import World, history_bounds

END = datetime(2026, 1, 1, tzinfo=UTC)


def simulated_interactions(
    users: int = 200, tracks: int = 600, days: int = 21, seed: int = 9
) -> tuple[World, pl.DataFrame, pl.DataFrame]:
    """A world, its positive interactions and its track features."""
    start, end = history_bounds(days, END)
    world = World.create(users=users, tracks=tracks, seed=seed, start=start, end=end)
    raw = conform(pl.concat(world.generate(start, end)).with_columns(pl.lit(1).alias("batch_id")), RAW_EVENTS_SCHEMA)
    clean = clean_events(raw, world.tracks_frame(), world.users_frame(), now=END, origin="test").clean
    return world, F.training_interactions(clean.lazy()).collect(), F.track_features(clean.lazy()).collect()


@pytest.fixture(scope="session")
def tiny_world() -> tuple[World, pl.DataFrame, pl.DataFrame]:
    return simulated_interactions()
