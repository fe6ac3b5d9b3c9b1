"""The ranker's top-k against a full sort: the same tracks, in the same order, never a heard one."""

from __future__ import annotations

import numpy as np
import pytest

from recsys_assets_tests.service.versions import write_version
from recsys_core.scoring import Ranker

ITEMS, USERS, DIM = 300, 6, 8


@pytest.fixture(scope="module")
def ranker(tmp_path_factory: pytest.TempPathFactory) -> Ranker:
    directory = tmp_path_factory.mktemp("version")
    rng = np.random.default_rng(4)
    # Small integers: every score is exact whatever BLAS's order of summation, with many ties.
    item_emb = rng.integers(-3, 4, size=(ITEMS + 1, DIM)).astype(np.float32)
    item_emb[10:20] = item_emb[9]  # a block of ten equal tracks
    user_emb = rng.integers(-3, 4, size=(USERS + 1, DIM)).astype(np.float32)
    # User 1 heard nothing, user 2 heard the tied block, user 3 heard all but five tracks.
    seen = [[], [], list(range(9, 21)), list(range(1, ITEMS - 4)), [], [], []]
    return Ranker.load(write_version(directory, user_emb, item_emb, seen), version=1)


def full_sort(ranker: Ranker, row: int, k: int) -> list[int]:
    scores = ranker.artifact.item_embeddings @ ranker.artifact.user_embeddings[row]
    banned = {0, *ranker.artifact.seen(row).tolist()}
    order = sorted((r for r in range(len(scores)) if r not in banned), key=lambda r: (-scores[r], r))
    return order[:k]


@pytest.mark.parametrize("user", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("k", [1, 10, 25, 100])
def test_top_k_is_the_full_sort_without_heard_tracks(ranker: Ranker, user: int, k: int) -> None:
    rows, scores, fallback = ranker.top_rows(f"u{user}", k)
    expected = full_sort(ranker, user, k)  # ties in row order
    assert not fallback
    assert rows.tolist() == expected
    assert np.all(np.diff(scores) <= 0)
    assert not set(rows.tolist()) & set(ranker.artifact.seen(user).tolist())


def test_ties_are_broken_by_row_so_answers_are_stable(ranker: Ranker) -> None:
    # User 5's best tracks are the block of equal ones: the answer lists them in row order, every time.
    ranker.users[5] = ranker.artifact.item_embeddings[9] * 10
    first = ranker.top_rows("u5", 5)[0].tolist()
    assert first == [9, 10, 11, 12, 13]
    assert all(ranker.top_rows("u5", 5)[0].tolist() == first for _ in range(5))


def test_a_user_who_heard_almost_everything_gets_what_is_left(ranker: Ranker) -> None:
    rows, _, _ = ranker.top_rows("u3", 50)
    assert sorted(rows.tolist()) == list(range(ITEMS - 4, ITEMS + 1))


def test_an_unknown_user_gets_the_popular_tracks_flagged(ranker: Ranker) -> None:
    rec = ranker.recommend("nobody", 3)
    assert rec.fallback
    assert rec.track_ids == ["t1", "t2", "t3"]


def test_a_query_tower_that_does_not_fit_the_version_is_refused(tmp_path) -> None:
    """Embeddings replaced by hand with the tower's weights left behind: refused at load, naming the
    files, not a matmul error at the first request."""
    from recsys_assets_tests.service.versions import with_history

    rng = np.random.default_rng(0)
    seen = [[], [1, 2], [3], [4, 5, 6]]
    directory = with_history(write_version(tmp_path / "v", rng.normal(size=(4, 9)), rng.normal(size=(31, 9)), seen), 4)
    assert Ranker.load(directory, 1).history_length == 4  # as written, it fits
    np.save(directory / "item_embeddings.npy", rng.normal(size=(31, 17)).astype(np.float32))
    np.save(directory / "user_embeddings.npy", rng.normal(size=(4, 17)).astype(np.float32))
    with pytest.raises(ValueError, match=r"query_tower.npz dimensions \+ 1 = 9, item_embeddings.npy columns = 17"):
        Ranker.load(directory, 1)


def test_the_query_tower_pools_the_history_by_recency(tmp_path) -> None:
    """The k-th most recent known track weighs decay**k; padding and unknown tracks (row 0) neither
    weigh nor take a position; the decay survives the npz; a version without one pools the plain mean."""
    from recsys_core.query_tower import QueryTower

    rng = np.random.default_rng(1)
    dim = 3
    tower = QueryTower(
        user_embedding=np.zeros((2, dim), dtype=np.float32),
        history_items=rng.normal(size=(6, dim)).astype(np.float32),
        history_kernel=np.eye(dim, dtype=np.float32),
        history_decay=0.5,
    )
    history = np.array([[4, 0, 2, 5, 0]])  # most recent first; a gap (an unknown track) and padding
    np.testing.assert_array_equal(tower.history_weights(history), [[1.0, 0.0, 0.5, 0.25, 0.0]])
    items = tower.history_items
    expected = (items[4] + 0.5 * items[2] + 0.25 * items[5]) / 1.75
    np.testing.assert_allclose(tower.embed_many(np.array([1]), None, history)[0, :dim], expected, rtol=1e-6)
    np.testing.assert_allclose(tower.embed(1, None, history[0])[:dim], expected, rtol=1e-6)
    np.testing.assert_array_equal(tower.embed(1, None, np.array([0, 0]))[:dim], np.zeros(dim))  # nothing heard

    tower.save(tmp_path)
    assert QueryTower.load(tmp_path).history_decay == 0.5
    weights = dict(np.load(tmp_path / "query_tower.npz"))
    del weights["history_decay"]
    np.savez(tmp_path / "query_tower.npz", **weights)  # as a version written before the recency weighting
    plain = QueryTower.load(tmp_path)
    assert plain.history_decay == 1.0
    np.testing.assert_allclose(plain.embed(1, None, history[0])[:dim], (items[4] + items[2] + items[5]) / 3, rtol=1e-6)


def test_the_session_term_moves_the_query_towards_the_last_plays(tmp_path) -> None:
    """query + weight · ‖x‖ · the mean unit candidate vector of the last `session_length` known plays;
    unknown rows and padding are skipped; no plays or a zero weight leave the query alone; the weight
    survives the npz, and a version written before the session term has none."""
    from recsys_core.query_tower import QueryTower, unit_directions

    dim = 2
    items = np.array([[0, 0, 0], [3, 4, 9], [0, 2, 9], [1, 0, 9], [5, 5, 9]], dtype=np.float32)  # last: the prior
    directions = unit_directions(items)
    np.testing.assert_allclose(directions[:4], [[0, 0], [0.6, 0.8], [0, 1], [1, 0]], rtol=1e-6)
    tower = QueryTower(
        user_embedding=np.zeros((2, dim), dtype=np.float32),
        history_items=np.zeros((5, dim), dtype=np.float32),
        history_kernel=np.eye(dim, dtype=np.float32),
        session_weight=0.5,
        session_length=2,
    )
    query = np.array([3.0, 4.0, 1.0], dtype=np.float32)  # ‖x‖ = 5
    moved = tower.with_session(query, np.array([2, 0, 1, 3]), directions)  # the last two known: rows 2 and 1
    np.testing.assert_allclose(moved, [3 + 0.5 * 5 * 0.3, 4 + 0.5 * 5 * 0.9, 1.0], rtol=1e-6)
    np.testing.assert_allclose(query, [3, 4, 1])  # the caller's query is not written to
    np.testing.assert_array_equal(tower.with_session(query, np.array([0, 0]), directions), query)
    np.testing.assert_array_equal(tower.with_session(query, np.array([], dtype=np.int64), directions), query)
    off = QueryTower(tower.user_embedding, tower.history_items, tower.history_kernel, session_length=2)
    np.testing.assert_array_equal(off.with_session(query, np.array([2, 1]), directions), query)

    tower.save(tmp_path)
    loaded = QueryTower.load(tmp_path)
    assert (loaded.session_weight, loaded.session_length) == (0.5, 2)
    weights = dict(np.load(tmp_path / "query_tower.npz"))
    del weights["session_weight"], weights["session_length"]
    np.savez(tmp_path / "query_tower.npz", **weights)  # as a version written before the session term
    assert QueryTower.load(tmp_path).session_weight == 0.0
