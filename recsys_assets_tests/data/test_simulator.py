"""The simulator: deterministic, realistic in shape, with a click model and a drift knob."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest

from recsys_core.contracts import LISTENING_EVENTS_SCHEMA
from recsys_sim.simulator import Drift, World, history_bounds

END = datetime(2026, 3, 1, tzinfo=UTC)


def simulate(seed: int = 3, users: int = 300, tracks: int = 1500, days: int = 21) -> tuple[World, pl.DataFrame]:
    start, end = history_bounds(days, END)
    world = World.create(users=users, tracks=tracks, seed=seed, start=start, end=end)
    return world, pl.concat(world.generate(start, end))


@pytest.fixture(scope="module")
def simulated() -> tuple[World, pl.DataFrame]:
    return simulate()


def test_same_seed_same_history_other_seed_other_history(simulated) -> None:
    _, events = simulated
    _, again = simulate()
    _, other = simulate(seed=4)
    assert events.equals(again)
    assert not events.equals(other)


def test_events_follow_the_contract_and_stay_in_the_window(simulated) -> None:
    _, events = simulated
    assert events.schema == pl.Schema(LISTENING_EVENTS_SCHEMA)
    assert events["event_id"].n_unique() == events.height
    start, end = history_bounds(21, END)
    assert events["played_at"].min() >= start
    assert events["played_at"].max() < end
    assert set(events["event_type"].unique()) == {"play", "skip", "like", "dislike"}
    plays = events.filter(pl.col("event_type") == "play")
    assert (plays["ms_played"] <= plays["track_duration_ms"]).all()


def test_popularity_is_long_tailed(simulated) -> None:
    _, events = simulated
    counts = events.filter(pl.col("event_type") == "play").group_by("track_id").len().sort("len", descending=True)
    top_share = counts.head(max(1, counts.height // 10))["len"].sum() / counts["len"].sum()
    assert top_share > 0.35  # the top 10% of tracks get well over 10% of plays


def test_skips_go_with_low_affinity_and_likes_with_high(simulated) -> None:
    world, events = simulated
    affinity = {
        kind: np.nanmean(world.affinity(frame["user_id"], frame["track_id"]))
        for kind, frame in events.partition_by("event_type", as_dict=True).items()
    }
    assert affinity[("skip",)] < affinity[("play",)] < affinity[("like",)]


def test_click_probability_ranks_liked_tracks_above_random_ones(simulated) -> None:
    world, events = simulated
    liked = events.filter(pl.col("event_type") == "like").head(2000)
    p_liked = world.click_probability(liked["user_id"], liked["track_id"])
    rng = np.random.default_rng(0)
    random_tracks = World.track_id(rng.integers(0, world.n_tracks, liked.height))
    p_random = world.click_probability(liked["user_id"], random_tracks)
    assert ((p_liked >= 0) & (p_liked <= 1)).all()
    assert p_liked.mean() > 2 * p_random.mean()
    assert np.isnan(world.click_probability(["stranger"], ["t0000001"])).all()


def test_the_catalogue_grows_during_the_history(simulated) -> None:
    world, events = simulated
    tracks = world.tracks_frame()
    start, _ = history_bounds(21, END)
    new = tracks.filter(pl.col("release_date") >= start.date())
    assert 0 < new.height < tracks.height
    first_play = events.group_by("track_id").agg(pl.col("played_at").min()).join(tracks, on="track_id")
    assert (first_play["played_at"].dt.date() >= first_play["release_date"]).all()


def test_drift_moves_tastes_and_adds_a_genre(tmp_path) -> None:
    world, _ = simulate(days=7)
    users = World.user_id(np.arange(world.n_users))
    before = world.a["user_vec"].copy()
    n_tracks = world.n_tracks
    world.apply_drift(Drift(taste_shift=0.6, new_genre=0.5), END)
    assert world.n_tracks > n_tracks
    assert "hyperpop" in world.genres
    moved = np.einsum("ij,ij->i", before, world.a["user_vec"])
    assert np.median(moved) < 0.9
    trending = world.a["genre_vec"][int(world.a["trending_genre"][0])]
    assert (world.a["user_vec"] @ trending).mean() > (before @ trending).mean()
    world.save(tmp_path)
    loaded = World.load(tmp_path)
    assert np.allclose(
        loaded.click_probability(users[:50], ["t0000001"] * 50), world.click_probability(users[:50], ["t0000001"] * 50)
    )
    assert loaded.state.drifts[0]["taste_shift"] == 0.6


@pytest.mark.parametrize(
    ("text", "message"),
    [("taste=1", "expected taste_shift"), ("taste_shift=2", "outside"), ("new_genre=x", "not a number")],
)
def test_bad_drift_specs_are_explained(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Drift.parse(text)


def test_simulated_users_react_with_the_tastes_the_stream_saved_last(tmp_path) -> None:
    """A traffic simulator started before a drift must click with the drifted tastes afterwards."""
    from recsys_sim.simulation import LiveWorld

    world, _ = simulate(days=7)
    world.save(tmp_path)
    live = LiveWorld(tmp_path, check_seconds=0)
    users, tracks = World.user_id(np.arange(50)), ["t0000001"] * 50
    before = live.click_probability(users, tracks)
    assert np.allclose(before, world.click_probability(users, tracks))
    world.apply_drift(Drift(taste_shift=0.9, new_genre=0.5), END)
    world.save(tmp_path)
    after = live.click_probability(users, tracks)
    assert np.allclose(after, world.click_probability(users, tracks))
    assert not np.allclose(after, before)
    assert live.n_users == world.n_users


def test_a_session_leans_to_the_genre_of_its_first_play_and_the_click_model_follows_it() -> None:
    """The short-term taste: with ``session_focus`` the plays of a session share its first play's
    genre more often than without, and clicks favour the genre of the user's latest session."""
    from dataclasses import replace

    from recsys_sim.simulator import Behaviour

    def same_genre_share(focus: float) -> tuple[World, float]:
        start, end = history_bounds(14, END)
        world = World.create(users=300, tracks=1500, seed=5, start=start, end=end)
        world.behaviour = replace(Behaviour(), session_focus=focus)
        events = pl.concat(world.generate(start, end)).filter(pl.col("event_type").is_in(["play", "skip"]))
        tracks = world._indices(events["track_id"], "t", world.n_tracks)
        genre = pl.Series(world.track_genre(tracks))
        # Consecutive plays of a user (sessions are runs of consecutive plays) in the same genre.
        frame = events.select("user_id", "played_at").with_columns(genre=genre).sort("user_id", "played_at")
        same = frame.select((pl.col("genre") == pl.col("genre").shift(1).over("user_id")).mean()).item()
        return world, same

    _, without = same_genre_share(0.0)
    world, with_focus = same_genre_share(0.3)
    assert with_focus > without + 0.03, (without, with_focus)

    mood = world.a["user_mood"]
    users = np.flatnonzero(mood >= 0)[:200]
    assert len(users) > 100
    genre = world.track_genre(np.arange(world.n_tracks))
    in_mood = np.array([np.flatnonzero(genre == mood[u])[0] for u in users])
    other = np.array([np.flatnonzero(genre != mood[u])[0] for u in users])
    p_in = world.click_probability(World.user_id(users), World.track_id(in_mood))
    world.behaviour = replace(world.behaviour, session_focus=0.0)
    p_static = world.click_probability(World.user_id(users), World.track_id(in_mood))
    assert (p_in > p_static).all()  # the same tracks, clicked more in the mood than by taste alone
    assert np.isfinite(world.click_probability(World.user_id(users), World.track_id(other))).all()
