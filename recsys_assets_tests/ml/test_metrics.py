"""The metric functions against hand-computed cases."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest

from recsys_assets.ml.metrics import (
    bootstrap_delta,
    build_eval_set,
    evaluate,
    popularity_scorer,
    ranking_metrics,
    top_k,
)

T = datetime(2025, 1, 1, tzinfo=UTC)


def pairs(rows: list[tuple[str, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        {"user_id": [r[0] for r in rows], "track_id": [r[1] for r in rows], "played_at": [T] * len(rows)}
    )


@pytest.fixture
def eval_set():
    # Train: u1 heard a, b; u2 heard c. Items ranked: a, b, c, d, e (d, e heard by u3 only).
    train = pairs([("u1", "a"), ("u1", "b"), ("u2", "c"), ("u3", "d"), ("u3", "e")])
    # Holdout: u1 → c, d and "new" (first seen in the holdout: relevant, never rankable); also a (already heard).
    # u2 → nothing relevant beyond what it heard → not evaluated; u4 has no training pair → not evaluated.
    holdout = pairs([("u1", "c"), ("u1", "d"), ("u1", "new"), ("u1", "a"), ("u2", "c"), ("u4", "a")])
    return build_eval_set(train, holdout)


def test_who_is_evaluated_and_what_is_relevant(eval_set) -> None:
    assert eval_set.users.tolist() == ["u1"]
    assert eval_set.items.tolist() == ["a", "b", "c", "d", "e"]
    assert eval_set.n_relevant.tolist() == [3]  # c, d and the never-seen "new"
    assert eval_set.sizes()["relevant_rankable_pairs"] == 2


def test_metrics_of_a_known_ranking(eval_set) -> None:
    # u1's ranking over the unseen items c, d, e: [e, c, d] → hits at ranks 2 and 3.
    recs = np.array([[4, 2, 3]])
    m = ranking_metrics(recs, eval_set, ks=(2, 3)).metrics
    assert m["precision@2"] == pytest.approx(1 / 2)
    assert m["recall@2"] == pytest.approx(1 / 3)
    assert m["hit_rate@2"] == 1.0
    dcg3 = 1 / math.log2(3) + 1 / math.log2(4)
    idcg3 = 1 + 1 / math.log2(3) + 1 / math.log2(4)  # min(3, |relevant| = 3) ideal hits
    assert m["ndcg@3"] == pytest.approx(dcg3 / idcg3)
    assert m["map@3"] == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert m["coverage@3"] == pytest.approx(3 / 5)
    # p(item) = listeners / training users: e and d → 1/3, c → 1/3.
    assert m["novelty@3"] == pytest.approx(-math.log2(1 / 3))


def test_evaluate_excludes_training_tracks(eval_set) -> None:
    # A scorer that loves the tracks u1 already heard: they must not be recommended.
    def scorer(users):
        return np.tile(np.array([10.0, 9.0, 1.0, 2.0, 0.0]), (len(users), 1))

    result = evaluate(scorer, eval_set, ks=(3,))
    assert result.recommendations.tolist() == [[3, 2, 4]]
    assert result.metrics["precision@3"] == pytest.approx(2 / 3)


def test_popularity_scorer_counts_distinct_listeners() -> None:
    train = pairs([("u1", "a"), ("u1", "a"), ("u2", "a"), ("u3", "b")])
    scores = popularity_scorer(train, np.array(["a", "b", "z"]))(np.array(["x"]))
    assert scores.tolist() == [[2.0, 1.0, 0.0]]


def test_simulated_ctr_is_the_mean_click_probability_of_the_top_10(eval_set) -> None:
    def clicks(users, tracks):
        return np.where(tracks == "c", 1.0, 0.0)

    result = ranking_metrics(np.array([[2, 3, 4]]), eval_set, ks=(3,), click_model=clicks)
    assert result.metrics["sim_ctr@10"] == pytest.approx(1 / 3)


def test_top_k_breaks_ties_by_index() -> None:
    assert top_k(np.array([[1.0, 3.0, 3.0, 0.0]]), 3).tolist() == [[1, 2, 0]]


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_more_users() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.3, 0.1, 2000), rng.normal(0.2, 0.1, 2000)
    mean, lo, hi = bootstrap_delta(a, b)
    assert lo < mean < hi
    assert lo > 0.09
    assert hi < 0.11
    _, lo_small, hi_small = bootstrap_delta(a[:50], b[:50])
    assert hi_small - lo_small > hi - lo
