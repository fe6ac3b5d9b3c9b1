"""Baselines for the offline comparison: EASE (Steck, 2019).

Popularity, the baseline every evaluation reports, is :func:`recsys_assets.ml.metrics.popularity_scorer`.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from recsys_assets.ml.metrics import Scorer


def ease_scorer(train: pl.DataFrame, items: np.ndarray, l2: float) -> Scorer:
    """EASE: item-item weights B = I - P / diag(P) with P = (XᵀX + λI)⁻¹, X the binary user×item matrix.

    Args:
        train: positives of the train side (``user_id``, ``track_id``).
        items: the ranked tracks (the evaluation's item order).
        l2: λ.
    """
    users, x = _user_items(train, items)
    b = ease_weights(x, l2)
    rows = dict(zip(users.to_list(), range(len(users)), strict=True))

    def score(user_ids: np.ndarray) -> np.ndarray:
        r = [rows.get(str(u), -1) for u in user_ids]
        known = np.array([i >= 0 for i in r])
        out = np.zeros((len(user_ids), len(items)), dtype=np.float32)
        if known.any():
            out[known] = x[[i for i in r if i >= 0]] @ b
        return out

    return score


def ease_weights(x, l2: float) -> np.ndarray:
    """EASE's item-item weights (float32, zero diagonal) of the binary user×item matrix ``x`` (a numpy
    array or a scipy sparse matrix):
    B = I - P / diag(P), P = (XᵀX + λI)⁻¹. A dense inverse: its cost grows as items³ (0.4 s at 2,000
    items, 2 s at 4,000 and 27 s at 9,700 on 2 cores)."""
    gram = x.T @ x
    gram = (gram.toarray() if hasattr(gram, "toarray") else gram).astype(np.float64)  # x: dense or scipy sparse
    gram[np.diag_indices_from(gram)] += l2
    p = np.linalg.inv(gram)
    b = (p / -np.diag(p)).astype(np.float32)
    np.fill_diagonal(b, 0.0)
    return b


def _user_items(train: pl.DataFrame, items: np.ndarray) -> tuple[pl.Series, np.ndarray]:
    """The users of ``train`` (sorted) and their binary user×item matrix over ``items``."""
    pairs = train.select("user_id", "track_id").unique()
    item_index = pl.DataFrame({"track_id": items, "col": np.arange(len(items))})
    users = pairs["user_id"].unique().sort()
    user_index = pl.DataFrame({"user_id": users, "row": np.arange(len(users))})
    coo = pairs.join(item_index, on="track_id").join(user_index, on="user_id")
    x = np.zeros((len(users), len(items)), dtype=np.float32)
    x[coo["row"].to_numpy(), coo["col"].to_numpy()] = 1.0
    return users, x


EASE_LAMBDAS = (100.0, 500.0, 2000.0)


def most_listened(train: pl.DataFrame, max_items: int) -> pl.Series:
    """The ``max_items`` tracks of ``train`` with the most listeners (ties by id): where a capped EASE
    is fitted."""
    return (
        train.select("user_id", "track_id").unique().group_by("track_id").len()
        .sort(["len", "track_id"], descending=[True, False]).head(max_items)["track_id"]
    )  # fmt: skip


def capped_ease_scorer(train: pl.DataFrame, items: np.ndarray, l2: float, max_items: int) -> Scorer:
    """EASE over the ``max_items`` tracks with the most listeners in ``train`` only (its cost is a
    dense ``max_items``² inverse); the other tracks of ``items`` are never recommended by it."""
    top = most_listened(train, max_items)
    keep = np.isin(items, top.to_numpy())
    inner = ease_scorer(train.filter(pl.col("track_id").is_in(top.implode())), items[keep], l2)

    def score(user_ids: np.ndarray) -> np.ndarray:
        out = np.full((len(user_ids), len(items)), -np.inf, dtype=np.float32)
        out[:, keep] = inner(user_ids)
        return out

    return score


def reference_ease(train: pl.DataFrame, validation, items: np.ndarray, max_items: int, evaluate) -> tuple:
    """EASE as a reference for a candidate: λ picked on ``validation`` (a ``(fit, holdout)`` split of
    ``train``, the same the candidate stopped early on) from :data:`EASE_LAMBDAS`, then fitted on
    ``train``. Returns ``(scorer, λ)``; ``evaluate(scorer, eval_set) -> float`` scores a λ."""
    from recsys_assets.ml.metrics import build_eval_set

    fit, holdout = validation
    best = pick_ease_lambda(fit, build_eval_set(fit, holdout), max_items, evaluate)
    return capped_ease_scorer(train, items, best, max_items), best


def pick_ease_lambda(fit: pl.DataFrame, val_set, max_items: int, evaluate) -> float:
    """The λ of :data:`EASE_LAMBDAS` whose capped EASE fitted on ``fit`` scores best on ``val_set``
    (``evaluate(scorer, eval_set) -> float``)."""
    return max(EASE_LAMBDAS, key=lambda lam: evaluate(capped_ease_scorer(fit, val_set.items, lam, max_items), val_set))
