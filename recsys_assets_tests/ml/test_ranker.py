"""The ranking stage: its tables count what they say, it learns what the retrieval misses, and its numpy
twin scores as the Keras network it was trained as; the one scorer applies a version's stage online
and offline alike."""

from __future__ import annotations

import zlib
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from recsys_assets.ml.buckets import UserBuckets
from recsys_assets.ml.metrics import build_eval_set, recommend
from recsys_assets.ml.ranker import (
    FOLDS,
    _ndcg10,
    candidates_of,
    fit_ranking_stage,
    ranker_examples,
    ranker_tables,
    served_validation_ndcg,
    train_ranker,
)
from recsys_assets_tests.service.versions import tiny_version, write_version
from recsys_core.ranking import FEATURES, features, rerank
from recsys_core.scoring import Ranker

pytestmark = pytest.mark.slow

START = datetime(2026, 1, 1)


def _world(seed: int = 0, users: int = 240, clusters: int = 8, per_cluster: int = 40):
    """Each user hears tracks of one cluster (an artist each): 12 before the cutoff, 4 after."""
    rng = np.random.default_rng(seed)
    rows, holdout = [], []
    for u in range(users):
        cluster = u % clusters
        picks = rng.choice(per_cluster, 16, replace=False) + cluster * per_cluster
        for i, track in enumerate(picks):
            row = {"user_id": f"u{u}", "track_id": f"t{track}", "played_at": START + timedelta(days=int(i))}
            (rows if i < 12 else holdout).append(row)
    tracks = pl.DataFrame({"track_id": [f"t{i}" for i in range(clusters * per_cluster)],
                           "artist_id": [f"a{i // per_cluster}" for i in range(clusters * per_cluster)]})  # fmt: skip
    return pl.DataFrame(rows), pl.DataFrame(holdout), tracks


def test_a_ranker_that_learns_nothing_is_not_kept() -> None:
    rng = np.random.default_rng(5)
    users = np.array([f"u{u}" for u in range(200)])
    x = rng.normal(size=(200, 40, len(FEATURES))).astype(np.float32)  # features unrelated to the labels
    labels = (rng.random((200, 40)) < 0.05).astype(np.float32)
    fitted = train_ranker(x, labels, labels.sum(axis=1).astype(np.int64), users, seed=1, max_epochs=10)
    assert not fitted.useful, fitted.gain_ci


def test_the_tables_count_listeners_and_users_in_common() -> None:
    pairs = pl.DataFrame({
        "user_id": ["a", "a", "b", "b", "c", "a"],
        "track_id": ["x", "y", "x", "y", "x", "x"],  # a heard x twice: one pair
        "played_at": [START, START, START, START + timedelta(days=30), START + timedelta(days=30), START],
    })  # fmt: skip
    tracks = pl.DataFrame({"track_id": ["x", "y", "z"], "artist_id": ["p", "p", "q"]})
    tables = ranker_tables(pairs, tracks, np.array(["x", "y", "z"]), ease_lambda=1.0, neighbours=2)
    # Listeners 3, 2 and 0, as percentiles of the catalogue; in the last 7 days 1, 1 and 0 (c's x, b's y).
    assert tables.popularity.tolist() == pytest.approx([1, 2 / 3, 1 / 3])
    assert tables.recent_popularity.tolist() == pytest.approx([2.5 / 3, 2.5 / 3, 1 / 3])
    # x and y share a and b: 2 / √(3 × 2); z has no neighbour.
    assert tables.neighbours[0, 0] == 1
    assert tables.similarity[0, 0] == pytest.approx(2 / np.sqrt(6), rel=1e-6)
    assert tables.neighbours[2].tolist() == [-1, -1]
    assert tables.artist[0] == tables.artist[1] != tables.artist[2]
    # EASE over x and y (z has no listener): G = XᵀX + λI = [[4, 2], [2, 3]], P = G⁻¹ = [[3, -2], [-2, 4]] / 8,
    # B[i, j] = -P[i, j] / P[j, j]: hearing x adds 0.5 to y, hearing y adds 2/3 to x.
    assert tables.ease_neighbours.tolist() == [[1, -1], [0, -1], [-1, -1]]
    np.testing.assert_allclose(tables.ease_weights, [[0.5, 0], [2 / 3, 0], [0, 0]], rtol=1e-6)
    # A user who heard x: the candidate y's EASE features are that weight (its sum, log1p, and its largest).
    x = features(tables, [np.array([0])], np.array([[1, 2]]), np.zeros((1, 2), np.float32))
    assert x[0, :, FEATURES.index("ease_sum")].tolist() == pytest.approx([np.log1p(0.5), 0])
    assert x[0, :, FEATURES.index("ease_max")].tolist() == pytest.approx([0.5, 0])
    # EASE only over the most-listened track: no pair to weigh, no EASE neighbour; the cosine ones remain.
    head_only = ranker_tables(pairs, tracks, np.array(["x", "y", "z"]), ease_lambda=1.0, neighbours=2, ease_items=1)
    assert (head_only.ease_neighbours == -1).all()
    assert (head_only.ease_weights == 0).all()
    assert head_only.neighbours[0, 0] == 1


def test_the_ranker_learns_what_the_retrieval_misses_and_its_twin_scores_alike() -> None:
    train, holdout, tracks = _world()
    items = np.array(sorted(tracks["track_id"].to_list(), key=lambda t: int(t[1:])))
    users = np.array([f"u{u}" for u in range(240)])
    column = {t: i for i, t in enumerate(items)}
    heard = [np.array(sorted(column[t] for t in train.filter(pl.col("user_id") == u)["track_id"])) for u in users]
    relevant = [np.array([column[t] for t in holdout.filter(pl.col("user_id") == u)["track_id"]]) for u in users]
    retrieval = np.random.default_rng(1).normal(size=(len(users), len(items))).astype(np.float32)  # knows nothing
    tables = ranker_tables(train, tracks, items, ease_lambda=100.0)
    x, labels, candidates = ranker_examples(retrieval, heard, relevant, tables, k=60)
    assert x.shape == (240, 60, len(FEATURES))
    assert not any(np.isin(candidates[u], heard[u]).any() for u in range(len(users)))

    n_relevant = np.array([len(r) for r in relevant])
    fitted = train_ranker(x, labels, n_relevant, users, seed=3, max_epochs=30)
    assert fitted.val_ndcg > 2 * fitted.val_ndcg_retrieval + 0.1, (fitted.val_ndcg, fitted.val_ndcg_retrieval)
    assert fitted.useful  # the gain's interval is above 0
    assert fitted.gain_ci[0] > 0.05

    # One network a fold, each judged on the fold it did not train on; the numpy twin of each scores its
    # fold as the Keras network did (the same arithmetic), and the served ranker is their mean.
    assert fitted.ranker.members == FOLDS
    assert (fitted.folds == np.array([zlib.crc32(u.encode()) % FOLDS for u in users])).all()
    for f in range(FOLDS):
        held = fitted.folds == f
        np.testing.assert_allclose(fitted.ranker.member(f).score(x[held]), fitted.out_of_fold[held], atol=1e-4)
    assert _ndcg10(fitted.out_of_fold, labels, n_relevant) == pytest.approx(fitted.val_ndcg, abs=1e-6)
    mean = np.mean([fitted.ranker.member(f).score(x[:5]) for f in range(FOLDS)], axis=0)
    np.testing.assert_allclose(fitted.ranker.score(x[:5]), mean, rtol=1e-5, atol=1e-5)

    # Reranked lists are the candidates in the ranker's order.
    _, picked = candidates_of(retrieval, heard, 60)
    order = rerank(fitted.ranker, tables, heard, candidates, picked)
    assert (np.sort(order, axis=1) == np.sort(candidates, axis=1)).all()
    hits = np.mean([np.isin(order[u, :10], relevant[u]).mean() for u in range(len(users))])
    assert hits > 0.05  # chance: 4 of ~308 unheard tracks


def test_a_trained_models_served_validation_score_is_its_stages_or_its_retrievals() -> None:
    # What the search judges its finalists by (ml/tuning.py): the validation NDCG@10 of what the version
    # would serve, the stage's out-of-fold reranking where it is kept, else the retrieval order.
    from types import SimpleNamespace

    train, _, tracks = _world()
    users = np.array(["[OOV]", *sorted(train["user_id"].unique().to_list())], dtype=object)
    items = np.array(["[OOV]", *tracks["track_id"].to_list()], dtype=object)
    rng = np.random.default_rng(2)
    trained = SimpleNamespace(
        fit_embeddings=(rng.normal(size=(len(users), 8)).astype(np.float32),
                        rng.normal(size=(len(items), 8)).astype(np.float32)),  # knows nothing: the stage pays
        vocab=SimpleNamespace(users=users, items=items),
        params=SimpleNamespace(seed=3),
    )  # fmt: skip
    served = served_validation_ndcg(trained, train, tracks, "user")
    _, summary = fit_ranking_stage(trained, train, train, tracks, "user")
    assert summary["kept"], summary
    assert served == pytest.approx(summary["val_ndcg@10"], abs=1e-5)
    assert served > summary["retrieval_val_ndcg@10"]
    # No stage can be fitted on a train side cut into user buckets, so it cannot say.
    two_buckets = UserBuckets.of(train, train.height // 2)
    assert len(two_buckets) > 1
    assert served_validation_ndcg(trained, two_buckets, tracks, "user") is None


def _with_ranking_stage(directory, n_rows: int, seed: int = 0) -> None:
    """A ranking stage of two networks of random weights and tables over ``n_rows`` item rows (row 0 the
    padding slot)."""
    from recsys_core.ranking import FEATURES, DcnRanker, RankerTables, save

    rng = np.random.default_rng(seed)
    f = len(FEATURES)
    net = DcnRanker(
        mean=np.zeros(f, np.float32), std=np.ones(f, np.float32),
        cross_kernel=rng.normal(size=(2, f, f)).astype(np.float32) / 4, cross_bias=np.zeros((2, f), np.float32),
        hidden_kernel=rng.normal(size=(2, f, 16)).astype(np.float32), hidden_bias=np.zeros((2, 16), np.float32),
        out_kernel=rng.normal(size=(2, 16, 1)).astype(np.float32), out_bias=np.zeros((2, 1), np.float32),
    )  # fmt: skip
    neighbours = rng.integers(1, n_rows, size=(n_rows, 5))
    tables = RankerTables(
        popularity=rng.random(n_rows).astype(np.float32), recent_popularity=rng.random(n_rows).astype(np.float32),
        neighbours=neighbours, similarity=rng.random((n_rows, 5)).astype(np.float32),
        artist=rng.integers(0, 7, size=n_rows), ease_neighbours=rng.integers(-1, n_rows, size=(n_rows, 5)),
        ease_weights=rng.random((n_rows, 5)).astype(np.float32),
    )  # fmt: skip
    save(directory, net, tables)


def test_a_ranking_stage_reorders_the_retrievals_candidates_offline_as_online(tmp_path) -> None:
    rng = np.random.default_rng(8)
    item_emb = rng.integers(-3, 4, size=(301, 8)).astype(np.float32)  # small integers: exact scores
    user_emb = rng.integers(-3, 4, size=(7, 8)).astype(np.float32)
    seen = [[], *[sorted(rng.choice(np.arange(1, 301), 20, replace=False).tolist()) for _ in range(6)]]
    directory = write_version(tmp_path / "v", user_emb, item_emb, seen)
    plain = Ranker.load(directory, version=1)
    _with_ranking_stage(directory, 301)
    staged = Ranker.load(directory, version=1)

    for user in range(1, 7):
        rows, scores, _ = staged.top_rows(f"u{user}", 10)
        candidates, _, _ = plain.top_rows(f"u{user}", 100)
        assert set(rows.tolist()) <= set(candidates.tolist())  # reordered, never a track from elsewhere
        assert np.all(np.diff(scores) <= 0)
        assert not set(rows.tolist()) & set(seen[user])
    assert any(staged.top_rows(f"u{u}", 10)[0].tolist() != plain.top_rows(f"u{u}", 10)[0].tolist()
               for u in range(1, 7))  # fmt: skip

    # The offline evaluation's scorer ranks the same ten, in the same order.
    pairs = pl.DataFrame(
        [(f"u{u}", staged.item_ids[r]) for u in range(1, 7) for r in seen[u]], schema=["user_id", "track_id"],
        orient="row",
    )  # fmt: skip
    holdout = pl.DataFrame({"user_id": [f"u{u}" for u in range(1, 7)], "track_id": ["t1"] * 6})
    eval_set = build_eval_set(pairs, holdout, items=pl.Series(staged.item_ids[1:].astype(str)).sort())
    offline = recommend(staged.scorer(eval_set.items), eval_set, 10)
    for i, user in enumerate(eval_set.users):
        online = staged.top_rows(str(user), 10)[0]
        assert eval_set.items[offline[i]].tolist() == staged.item_ids[online].tolist()


def test_a_ranking_stage_that_does_not_fit_the_version_is_refused(tmp_path) -> None:
    directory = tiny_version(tmp_path / "v")
    _with_ranking_stage(directory, 12)
    with pytest.raises(ValueError, match=r"ranker\.npz has 12 item rows, items\.parquet 31"):
        Ranker.load(directory, version=1)


@pytest.mark.parametrize("earlier", ["first", "without EASE"])
def test_a_stage_of_an_earlier_format_is_served_in_retrieval_order(tmp_path, caplog, earlier) -> None:
    from recsys_core import ranking

    _with_ranking_stage(tmp_path, 11)
    assert ranking.load(tmp_path) is not None
    with np.load(tmp_path / ranking.RANKER_FILE) as stored:
        if earlier == "first":  # one network, log counts
            old = {k.replace("table_popularity", "table_log_popularity"): v[0] if k.startswith("net_c") else v
                   for k, v in stored.items() if k not in ("table_recent_popularity", "table_ease_neighbours",
                                                           "table_ease_weights")}  # fmt: skip
        else:  # the cross-fit on percentiles, eight features
            old = {k: v for k, v in stored.items() if not k.startswith("table_ease")}
    np.savez(tmp_path / ranking.RANKER_FILE, **old)
    assert ranking.load(tmp_path) is None
    assert "older format" in caplog.text
