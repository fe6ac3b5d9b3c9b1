"""Offline evaluation: ranking metrics on a temporal holdout, exactly as documented in the README.

- Evaluated users have at least one training pair and at least one relevant item; relevant = the
  user's holdout tracks that are not among the user's training tracks (tracks first seen in the
  holdout stay relevant and count as misses).
- Every track seen in training is ranked, except the user's training tracks.
- At k = 10 and 20: precision = hits/k, recall = hits/|relevant|, NDCG with binary gains and the ideal
  DCG over min(k, |relevant|), hit rate, MAP = Σ precision at each hit / min(k, |relevant|); plus
  catalogue coverage (distinct recommended tracks / tracks ranked) and novelty (mean self-information
  −log2 p(track) of the recommended tracks, p = share of training users who played the track).
- Simulated CTR@10, when the data came from the simulator: the mean true click probability of the top
  10 under the simulator's click model.

Any model enters as a *scorer*: a function from user ids to a score matrix over the ranked tracks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

K_VALUES = (10, 20)
USER_CHUNK = 2048

Scorer = Callable[[np.ndarray], np.ndarray]  # user ids (n,) -> scores (n, n_items), higher is better
ClickModel = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (user ids, track ids) -> probabilities


@dataclass(frozen=True)
class EvalSet:
    """What is ranked for whom, and what counts as relevant.

    Attributes:
        items: the ranked tracks (every track of the train side), in index order.
        users: the evaluated users.
        seen_indptr, seen_indices: each evaluated user's training tracks (CSR over ``items``).
        relevant_keys: sorted ``user_row * n_items + item`` of the relevant tracks that can be ranked.
        n_relevant: |relevant| per user, tracks first seen in the holdout included.
        item_probability: share of training users who played each ranked track.
    """

    items: np.ndarray
    users: np.ndarray
    seen_indptr: np.ndarray
    seen_indices: np.ndarray
    relevant_keys: np.ndarray
    n_relevant: np.ndarray
    item_probability: np.ndarray

    @property
    def n_items(self) -> int:
        return len(self.items)

    def sizes(self) -> dict[str, int]:
        return {
            "eval_users": len(self.users),
            "relevant_pairs": int(self.n_relevant.sum()),
            "relevant_rankable_pairs": len(self.relevant_keys),
            "ranked_tracks": self.n_items,
        }


def _relevant(train_pairs: pl.DataFrame, holdout: pl.DataFrame) -> pl.DataFrame:
    """The (user, track) pairs of ``holdout`` that count: new to a user who has training pairs."""
    return (
        holdout.select("user_id", "track_id")
        .unique()
        .join(train_pairs, on=["user_id", "track_id"], how="anti")
        .join(train_pairs.select("user_id").unique(), on="user_id", how="semi")
    )


def eval_users(train: pl.DataFrame, holdout: pl.DataFrame) -> pl.Series:
    """The users :func:`build_eval_set` evaluates, sorted (without building it)."""
    return _relevant(train.select("user_id", "track_id").unique(), holdout)["user_id"].unique().sort()


def build_eval_set(train: pl.DataFrame, holdout: pl.DataFrame, items: pl.Series | None = None) -> EvalSet:
    """The evaluation set of a split (train and holdout positives with ``user_id``, ``track_id``).

    ``items``: the ranked tracks, sorted (default: every track of ``train``); given when ``train`` and
    ``holdout`` are a sample of the split's users, so that they are ranked among all of its tracks."""
    train_pairs = train.select("user_id", "track_id").unique()
    items = train_pairs["track_id"].unique().sort() if items is None else items
    item_index = pl.DataFrame({"track_id": items, "item": np.arange(len(items), dtype=np.int64)})
    relevant = _relevant(train_pairs, holdout)
    users = relevant["user_id"].unique().sort()
    user_index = pl.DataFrame({"user_id": users, "row": np.arange(len(users), dtype=np.int64)})
    n_relevant = relevant.group_by("user_id").len().join(user_index, on="user_id").sort("row")["len"].to_numpy()
    rankable = relevant.join(item_index, on="track_id").join(user_index, on="user_id")
    relevant_keys = np.sort((rankable["row"] * len(items) + rankable["item"]).to_numpy())
    seen = train_pairs.join(user_index, on="user_id").join(item_index, on="track_id").sort("row", "item")
    counts = np.bincount(seen["row"].to_numpy(), minlength=len(users))
    seen_indptr = np.concatenate([[0], np.cumsum(counts)])
    n_train_users = max(train_pairs["user_id"].n_unique(), 1)
    counts = train_pairs.group_by("track_id").len()
    listeners = item_index.join(counts, on="track_id", how="left").sort("item")["len"].fill_null(0).to_numpy()
    return EvalSet(
        items=items.to_numpy(),
        users=users.to_numpy(),
        seen_indptr=seen_indptr,
        seen_indices=seen["item"].to_numpy(),
        relevant_keys=relevant_keys,
        n_relevant=n_relevant.astype(np.int64),
        item_probability=listeners / n_train_users,
    )


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores per row, best first (ties by lower index)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, -k:]  # no negated copy of the matrix
    order = np.lexsort((part, -np.take_along_axis(scores, part, axis=1)), axis=1)
    return np.take_along_axis(part, order, axis=1)


def recommend(
    scorer: Scorer, eval_set: EvalSet, k: int, top: Callable[[np.ndarray, int], np.ndarray] = top_k
) -> np.ndarray:
    """Top-``k`` ranked-track indices per evaluated user, their training tracks excluded (``top``: a
    :func:`top_k` of the same contract, e.g. the training's TensorFlow one)."""
    out = np.empty((len(eval_set.users), min(k, eval_set.n_items)), dtype=np.int64)
    for start in range(0, len(eval_set.users), USER_CHUNK):
        stop = min(start + USER_CHUNK, len(eval_set.users))
        scores = np.asarray(scorer(eval_set.users[start:stop]), dtype=np.float32)
        if scores.shape != (stop - start, eval_set.n_items):
            raise ValueError(f"the scorer returned {scores.shape}, expected {(stop - start, eval_set.n_items)}")
        for row in range(start, stop):
            seen = eval_set.seen_indices[eval_set.seen_indptr[row] : eval_set.seen_indptr[row + 1]]
            scores[row - start, seen] = -np.inf
        out[start:stop] = top(scores, k)
    return out


@dataclass
class Evaluation:
    metrics: dict[str, float]
    per_user: dict[str, np.ndarray] = field(repr=False)
    recommendations: np.ndarray = field(repr=False)


def ranking_metrics(
    recs: np.ndarray,
    eval_set: EvalSet,
    ks: Sequence[int] = K_VALUES,
    click_model: ClickModel | None = None,
) -> Evaluation:
    """The metrics of the module docstring for top-k lists ``recs`` (rows = evaluated users)."""
    n_users = len(eval_set.users)
    rows = np.arange(n_users)[:, None]
    hits = np.isin(rows * eval_set.n_items + recs, eval_set.relevant_keys)
    n_rel = np.maximum(eval_set.n_relevant, 1)
    discounts = 1.0 / np.log2(np.arange(2, recs.shape[1] + 2))
    metrics: dict[str, float] = {}
    per_user: dict[str, np.ndarray] = {}
    for k in ks:
        h = hits[:, :k]
        n_hits = h.sum(axis=1)
        ideal_len = np.minimum(k, n_rel)
        ideal = np.cumsum(discounts[:k])[np.minimum(ideal_len, k) - 1]
        cum_hits = np.cumsum(h, axis=1)
        per_user[f"precision@{k}"] = n_hits / k
        per_user[f"recall@{k}"] = n_hits / n_rel
        per_user[f"ndcg@{k}"] = (h * discounts[:k]).sum(axis=1) / ideal
        per_user[f"hit_rate@{k}"] = (n_hits > 0).astype(np.float64)
        per_user[f"map@{k}"] = (h * cum_hits / np.arange(1, h.shape[1] + 1)).sum(axis=1) / ideal_len
        top = recs[:, :k]
        metrics[f"coverage@{k}"] = float(len(np.unique(top)) / max(eval_set.n_items, 1))
        probability = np.clip(eval_set.item_probability[top], 1e-12, 1.0)
        per_user[f"novelty@{k}"] = (-np.log2(probability)).mean(axis=1)
    if click_model is not None:
        top = recs[:, :10]
        users = np.repeat(eval_set.users, top.shape[1])
        probabilities = np.asarray(click_model(users, eval_set.items[top.ravel()]), dtype=np.float64)
        per_user["sim_ctr@10"] = probabilities.reshape(top.shape).mean(axis=1)
    for name, values in per_user.items():
        metrics[name] = float(values.mean()) if n_users else 0.0
    return Evaluation(metrics=metrics, per_user=per_user, recommendations=recs)


def evaluate(
    scorer: Scorer, eval_set: EvalSet, ks: Sequence[int] = K_VALUES, click_model: ClickModel | None = None
) -> Evaluation:
    """Rank for every evaluated user with ``scorer`` and compute the metrics."""
    if len(eval_set.users) == 0:
        raise ValueError("no user has both a training pair and a relevant holdout track: nothing to evaluate")
    recs = recommend(scorer, eval_set, max(ks))
    return ranking_metrics(recs, eval_set, ks, click_model)


def popularity_scorer(train: pl.DataFrame, items: np.ndarray) -> Scorer:
    """Rank by the number of training users who played each track (the baseline)."""
    counts = train.select("user_id", "track_id").unique().group_by("track_id").len()
    index = pl.DataFrame({"track_id": items}).join(counts, on="track_id", how="left")
    scores = index["len"].fill_null(0).to_numpy().astype(np.float32)

    def score(users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(scores, (len(users), len(scores))).copy()

    return score


def bootstrap_delta(
    a: np.ndarray, b: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over users and its bootstrap confidence interval (users resampled)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(diff) == 0:
        return 0.0, 0.0, 0.0
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(diff), size=(n, len(diff)))
    means = diff[samples].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(diff.mean()), float(lo), float(hi)
