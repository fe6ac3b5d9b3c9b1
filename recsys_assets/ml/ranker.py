"""The ranking stage's training (plain module: no Dagster): tables from the train side, DCNs in Keras.

The ranker learns from the retrieval model as it was before its refit, the one scored on the
validation split: its top ``K_CANDIDATES`` for each validation user, with the features of
:mod:`recsys_core.ranking` computed from the fit part, labelled by the validation holdout. The loss is
a softmax over each user's candidates (listwise, as the metric ranks). The holdout of the evaluation
is never seen.

It is a cross-fit over the validation users (``FOLDS`` folds by a hash of the id): each fold's
network trains on the other folds' lists and keeps the epoch with the best NDCG@10 of its own fold's
reranked lists; the served ranker is the networks' mean. Every validation user is then both trained on
(by three networks) and judged out of fold (by the fourth). With one network, three quarters to train
and a quarter to judge, the stage's gain on a sparse catalogue (validation users with a few plays
each) was noise: +25%, −10%, −14% by seed (docs/benchmarks.md).

Its EASE features weigh the heard tracks by EASE's item-to-item weights, fitted on the same side as
the other tables, with the λ that scores EASE best on the validation split (``EASE_LAMBDAS``, as the
evaluation's EASE reference picks its own); the λ is recorded with the stage.

The stage is kept only where it pays: when the lower bound of the 95% bootstrap interval of the
out-of-fold NDCG@10 gain over the retrieval order, over all the validation users, is above 0
(``TrainedRanker.useful``). Otherwise the retrieval order is served as it is.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta

import numpy as np
import polars as pl

from recsys_assets.ml.metrics import bootstrap_delta
from recsys_core.ranking import K_CANDIDATES, NEIGHBOURS, RECENT_DAYS, DcnRanker, RankerTables, features

log = logging.getLogger(__name__)

HIDDEN = 32
FOLDS = 4  # the cross-fit's folds of the validation users, and the served ranker's networks
# EASE's weights are fitted over this many most-listened tracks: a dense inverse, whose cost grows as
# the cube (2 s at 4,000 on 2 cores, 27 s at 9,700), and the stage fits it four times (three λ, the
# served tables). The tail beyond has the cosine neighbours only.
EASE_ITEMS = 4000


def ranker_tables(
    pairs: pl.DataFrame,
    tracks: pl.DataFrame,
    items: np.ndarray,
    ease_lambda: float,
    neighbours: int = NEIGHBOURS,
    ease_items: int = EASE_ITEMS,
) -> RankerTables:
    """The per-track tables of ``pairs`` (``user_id``, ``track_id``, ``played_at``) over the tracks
    ``items`` (the scores' columns); ``tracks`` gives each track's ``artist_id``; EASE's weights with
    λ ``ease_lambda`` over the ``ease_items`` tracks with the most listeners."""
    from scipy import sparse
    from scipy.stats import rankdata

    from recsys_assets.ml.baselines import ease_weights

    index = pl.DataFrame({"track_id": pl.Series(items).cast(pl.String), "col": np.arange(len(items))})
    known = pairs.select("user_id", pl.col("track_id").cast(pl.String), "played_at").join(index, on="track_id")
    users = known["user_id"].cast(pl.String).rank("dense").to_numpy().astype(np.int64) - 1
    cols = known["col"].to_numpy()
    matrix = sparse.csr_matrix((np.ones(len(cols), dtype=np.float32), (users, cols)),
                               shape=(int(users.max()) + 1 if len(users) else 0, len(items)))  # fmt: skip
    matrix.data[:] = 1.0  # a pair counts once, however often it was played (the constructor sums them)
    listeners = np.asarray(matrix.sum(axis=0)).ravel()
    last = known["played_at"].max()
    recent = known.filter(pl.col("played_at") > last - timedelta(days=RECENT_DAYS)) if last is not None else known
    recent_counts = (
        np.bincount(recent["col"].to_numpy(), minlength=len(items)) if recent.height else np.zeros(len(items))
    )
    co = (matrix.T @ matrix).tocsr()  # users in common
    co.setdiag(0)
    co.eliminate_zeros()
    norm = np.sqrt(np.maximum(listeners, 1.0))
    near = np.full((len(items), neighbours), -1, dtype=np.int64)
    sims = np.zeros((len(items), neighbours), dtype=np.float32)
    for i in range(len(items)):
        start, end = co.indptr[i], co.indptr[i + 1]
        if start == end:
            continue
        cols_i = co.indices[start:end]
        values = co.data[start:end] / (norm[i] * norm[cols_i])
        keep = np.argsort(-values, kind="stable")[:neighbours]
        near[i, : len(keep)] = cols_i[keep]
        sims[i, : len(keep)] = values[keep]
    artists = pl.DataFrame({"track_id": index["track_id"]}).join(
        tracks.select(pl.col("track_id").cast(pl.String), "artist_id"), on="track_id", how="left", maintain_order="left"
    )["artist_id"]
    artist = artists.fill_null("").rank("dense").to_numpy().astype(np.int64) - 1
    head = np.argsort(-listeners, kind="stable")[: min(ease_items, int((listeners > 0).sum()))]
    ease_near = np.full((len(items), neighbours), -1, dtype=np.int64)
    ease_values = np.zeros((len(items), neighbours), dtype=np.float32)
    if len(head) > 1:
        weights = ease_weights(matrix[:, head], ease_lambda)  # row i: what hearing head[i] adds to each track
        width = min(neighbours, len(head) - 1)
        top = np.argpartition(-weights, width - 1, axis=1)[:, :width]
        values = np.take_along_axis(weights, top, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        top, values = np.take_along_axis(top, order, axis=1), np.take_along_axis(values, order, axis=1)
        ease_near[head, :width] = np.where(values > 0, head[top], -1)  # a negative weight: not a neighbour
        ease_values[head, :width] = np.maximum(values, 0.0)
    return RankerTables(
        popularity=(rankdata(listeners) / len(items)).astype(np.float32),
        recent_popularity=(rankdata(recent_counts) / len(items)).astype(np.float32),
        neighbours=near,
        similarity=sims,
        artist=artist,
        ease_neighbours=ease_near,
        ease_weights=ease_values,
    )


def candidates_of(scores: np.ndarray, heard: list[np.ndarray], k: int = K_CANDIDATES) -> tuple[np.ndarray, np.ndarray]:
    """Each user's top ``k`` columns of ``scores`` (users × items), heard tracks left out, best first;
    and their scores."""
    scores = scores.copy()
    for u, rows in enumerate(heard):
        scores[u, rows] = -np.inf
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    picked = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    picked = np.take_along_axis(picked, order, axis=1)
    finite = np.isfinite(picked)
    floor = picked[finite].min() - 1.0 if finite.any() else 0.0
    return top, np.where(finite, picked, floor)  # a user with fewer than k unheard tracks: the rest last


def _ndcg10(ranked: np.ndarray, labels: np.ndarray, n_relevant: np.ndarray) -> float:
    """Mean NDCG@10 of scores ``ranked`` (users × K) against binary ``labels``; the ideal DCG over
    min(10, |relevant|), relevant tracks outside the candidates included."""
    return float(np.mean(_ndcg10_per_user(ranked, labels, n_relevant)))


def _ndcg10_per_user(ranked: np.ndarray, labels: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    order = np.argsort(-ranked, axis=1, kind="stable")[:, :10]
    gains = np.take_along_axis(labels, order, axis=1)
    discounts = 1.0 / np.log2(np.arange(2, 12))
    dcg = (gains * discounts[: gains.shape[1]]).sum(axis=1)
    ideal = np.array([discounts[: min(10, int(n))].sum() for n in n_relevant])
    return np.where(ideal > 0, dcg / np.maximum(ideal, 1e-9), 0.0)


@dataclass
class TrainedRanker:
    ranker: DcnRanker  # the cross-fit's networks, averaged
    history: list[dict] = field(default_factory=list)  # every fold's epochs
    val_ndcg_retrieval: float = 0.0  # the validation users' NDCG@10 of the retrieval order
    val_ndcg: float = 0.0  # and of the out-of-fold reranking
    gain_ci: tuple[float, float] = (0.0, 0.0)  # the 95% bootstrap interval of the gain, over those users
    out_of_fold: np.ndarray | None = field(default=None, repr=False)  # each list's scores by the fold's network
    folds: np.ndarray | None = field(default=None, repr=False)  # each list's fold
    ease_lambda: float = 0.0  # the λ of the EASE features' weights, picked on the validation split

    @property
    def useful(self) -> bool:
        """Whether the gain is more than the validation users' noise: the stage is kept only then."""
        return self.gain_ci[0] > 0

    @property
    def epochs_per_fold(self) -> list[int]:
        """How many epochs each fold's network trained (its best one is kept)."""
        return [sum(1 for h in self.history if h["fold"] == f) for f in range(FOLDS)]


def fold_of(user_ids: np.ndarray, folds: int = FOLDS) -> np.ndarray:
    """Each user's fold of the cross-fit, by a hash of the id (the same user, the same fold, every run)."""
    return np.array([zlib.crc32(str(u).encode()) % folds for u in user_ids])


def train_ranker(
    x: np.ndarray,
    labels: np.ndarray,
    n_relevant: np.ndarray,
    user_ids: np.ndarray,
    seed: int = 42,
    max_epochs: int = 60,
    patience: int = 8,
    learning_rate: float = 0.01,
    progress: Callable[[dict], None] | None = None,
) -> TrainedRanker:
    """Train the DCN on candidate lists by a ``FOLDS``-fold cross-fit over the users: ``x`` users × K ×
    features, ``labels`` users × K (1: in the user's validation holdout), ``n_relevant`` per user (the
    NDCG's ideal), ``user_ids`` (the folds).

    Each fold's network trains on the other folds' lists and stops early on its own fold. The served
    ranker averages the networks, and the keep rule judges the out-of-fold scores of every user: a
    validation of a few hundred users is too noisy to judge on a quarter of them, and to train on three
    quarters with one network (hand-written: scikit-learn's cross-validation drives estimators, not a
    Keras loop that keeps each fold's best epoch).
    """
    folds = fold_of(user_ids)
    positive = labels.sum(axis=1) > 0  # a list without a positive teaches a softmax nothing
    for f in range(FOLDS):
        if (positive & (folds != f)).sum() < 10 or (folds == f).sum() < 5:
            raise ValueError(f"{int(positive.sum())} lists with a positive among {len(folds)} validation users: "
                             "too few to train a ranker")  # fmt: skip
    flat = x[positive].reshape(-1, x.shape[-1])
    mean, std = flat.mean(axis=0).astype(np.float32), (flat.std(axis=0) + 1e-6).astype(np.float32)
    out_of_fold = np.zeros(labels.shape, dtype=np.float32)
    members, history = [], []
    for f in range(FOLDS):
        held = folds == f
        weights, scores, epochs = _train_fold(x[~held & positive], labels[~held & positive], x[held], labels[held],
                                              n_relevant[held], mean, std, seed + f, max_epochs, patience,
                                              learning_rate)  # fmt: skip
        out_of_fold[held] = scores
        members.append(weights)
        for record in epochs:
            history.append({"fold": f, **record})
            if progress is not None:
                progress(history[-1])
    order = -np.arange(x.shape[1], dtype=np.float32)[None].repeat(len(x), 0)
    ranked = _ndcg10_per_user(out_of_fold, labels, n_relevant)
    retrieval = _ndcg10_per_user(order, labels, n_relevant)
    _, low, high = bootstrap_delta(ranked, retrieval, seed=seed)
    ranker = DcnRanker(mean, std, **{k: np.stack([m[k] for m in members]) for k in members[0]})
    log.info("ranker: out-of-fold NDCG@10 %.4f (retrieval order %.4f, gain CI [%.4f, %.4f])",
             ranked.mean(), retrieval.mean(), low, high)  # fmt: skip
    return TrainedRanker(ranker, history, float(retrieval.mean()), float(ranked.mean()), (low, high), out_of_fold,
                         folds)  # fmt: skip


def _train_fold(x, labels, x_held, labels_held, n_relevant_held, mean, std, seed, max_epochs, patience,
                learning_rate) -> tuple[dict[str, np.ndarray], np.ndarray, list[dict]]:  # fmt: skip
    """One network of the cross-fit: its weights at the epoch with the best held-out NDCG@10, its
    scores of the held-out lists, and its epochs."""
    import tensorflow as tf
    import tensorflow_recommenders as tfrs

    tf.keras.utils.set_random_seed(seed)
    cross = tfrs.layers.dcn.Cross()
    hidden = tf.keras.layers.Dense(HIDDEN, activation="relu")
    out = tf.keras.layers.Dense(1)
    inputs = tf.keras.Input((None, x.shape[-1]))
    model = tf.keras.Model(inputs, tf.squeeze(out(hidden(cross((inputs - mean) / std))), -1))
    optimizer = tf.keras.optimizers.Adam(learning_rate)
    target = labels / labels.sum(axis=1, keepdims=True)
    data = tf.data.Dataset.from_tensor_slices((x, target.astype(np.float32)))

    @tf.function
    def step(batch_x, batch_y):
        with tf.GradientTape() as tape:
            logits = model(batch_x, training=True)
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(batch_y, logits))
        optimizer.apply_gradients(
            zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables, strict=True)
        )
        return loss

    best, best_weights, best_scores, waited, epochs = -1.0, None, None, 0, []
    for epoch in range(1, max_epochs + 1):
        losses = [float(step(bx, by)) for bx, by in data.shuffle(len(target), seed=seed + epoch).batch(64)]
        scores = model(x_held, training=False).numpy()
        value = _ndcg10(scores, labels_held, n_relevant_held)
        epochs.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_ndcg@10": value})
        if value > best:
            best, best_scores, waited = value, scores, 0
            best_weights = {
                "cross_kernel": cross._dense.kernel.numpy(), "cross_bias": cross._dense.bias.numpy(),
                "hidden_kernel": hidden.kernel.numpy(), "hidden_bias": hidden.bias.numpy(),
                "out_kernel": out.kernel.numpy(), "out_bias": out.bias.numpy(),
            }  # fmt: skip
        else:
            waited += 1
            if waited >= patience:
                break
    return best_weights, best_scores, epochs


def ranker_examples(
    scores: np.ndarray, heard: list[np.ndarray], relevant: list[np.ndarray], tables: RankerTables, k: int = K_CANDIDATES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels and candidates of each user's top ``k`` (``relevant``: the columns of each
    user's holdout tracks)."""
    candidates, picked = candidates_of(scores, heard, k)
    x = features(tables, heard, candidates, picked)
    labels = np.zeros(candidates.shape, dtype=np.float32)
    for u, rows in enumerate(relevant):
        labels[u] = np.isin(candidates[u], rows)
    return x, labels, candidates


def heard_columns(eval_set) -> list[np.ndarray]:
    """Each evaluated user's train-side tracks, as columns of ``eval_set.items``."""
    bounds = zip(eval_set.seen_indptr[:-1], eval_set.seen_indptr[1:], strict=True)
    return [eval_set.seen_indices[a:b] for a, b in bounds]


def relevant_columns(eval_set) -> list[np.ndarray]:
    """Each evaluated user's relevant tracks that can be ranked, as columns."""
    users = eval_set.relevant_keys // eval_set.n_items
    starts = np.searchsorted(users, np.arange(1, len(eval_set.users)))
    return np.split(eval_set.relevant_keys % eval_set.n_items, starts)


def learn_on_validation(trained, fit_pairs: pl.DataFrame, val_set, tracks: pl.DataFrame, seed: int,
                        progress: Callable[[dict], None] | None = None) -> TrainedRanker:  # fmt: skip
    """Train the ranker on the validation split: the candidates of ``trained``'s model before its refit
    (``fit_embeddings``) for the users of ``val_set``, the features from ``fit_pairs`` (the fit part),
    with the λ of the EASE features that scores best on the same split (as the EASE baseline picks its
    own)."""
    from recsys_assets.ml.baselines import pick_ease_lambda
    from recsys_assets.ml.metrics import evaluate
    from recsys_assets.ml.two_tower import Vocabulary

    fit_users, fit_items = trained.fit_embeddings
    user_rows = Vocabulary.index(pl.Series(val_set.users), trained.vocab.users)
    item_rows = Vocabulary.index(pl.Series(val_set.items), trained.vocab.items)
    items_t = np.ascontiguousarray(fit_items[item_rows].T)
    heard, relevant = heard_columns(val_set), relevant_columns(val_set)
    ease_lambda = pick_ease_lambda(fit_pairs, val_set, EASE_ITEMS, lambda s, on: evaluate(s, on).metrics["ndcg@10"])
    tables = ranker_tables(fit_pairs, tracks, val_set.items, ease_lambda)
    parts = []
    for start in range(0, len(user_rows), 256):  # users × items scores a chunk at a time
        chunk = slice(start, start + 256)
        scores = fit_users[user_rows[chunk]] @ items_t
        scores[:, item_rows == 0] = -np.inf
        parts.append(ranker_examples(scores, heard[chunk], relevant[chunk], tables))
    x = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    fitted = train_ranker(x, labels, val_set.n_relevant, val_set.users, seed=seed, progress=progress)
    return replace(fitted, ease_lambda=ease_lambda)


_BUCKETS_REASON = (
    "the train side is cut into user buckets; the ranking stage needs it in memory (RECSYS_TRAIN_BUCKET_ROWS)"
)


def _on_validation(trained, window, tracks: pl.DataFrame, protocol: str,
                   progress: Callable[[dict], None] | None = None) -> tuple[TrainedRanker | None, dict]:  # fmt: skip
    """The stage :func:`learn_on_validation` fits for ``trained`` on the validation split of ``window``
    (cut again, as the training cut it), or ``None`` and why not; and the validation users' count."""
    from recsys_assets.ml.buckets import UserBuckets
    from recsys_assets.ml.metrics import build_eval_set
    from recsys_assets.ml.split import bucket_splits

    if trained.fit_embeddings is None:
        return None, {"reason": "the model trained without a validation split"}
    if isinstance(window, UserBuckets) and len(window) > 1:
        return None, {"reason": _BUCKETS_REASON}
    window = window.collect() if isinstance(window, UserBuckets) else window
    split = next(bucket_splits(UserBuckets((window,)), protocol))  # the training's own validation split
    val_set = build_eval_set(split.train, split.holdout)
    try:
        fitted = learn_on_validation(trained, split.train, val_set, tracks, trained.params.seed, progress)
    except ValueError as exc:  # too few validation users with a positive among their candidates
        return None, {"reason": str(exc)}
    return fitted, {"validation_users": len(val_set.users)}


def served_validation_ndcg(trained, window, tracks: pl.DataFrame, protocol: str) -> float | None:
    """The validation NDCG@10 of what a version of ``trained`` would serve: the stage's out-of-fold
    reranking where the stage is kept, else the retrieval order (``None``: no stage can be fitted).
    The hyperparameter search (ml/tuning.py) judges its finalists by it."""
    fitted, _ = _on_validation(trained, window, tracks, protocol)
    if fitted is None:
        return None
    return fitted.val_ndcg if fitted.useful else fitted.val_ndcg_retrieval


def fit_ranking_stage(trained, window, train_side, tracks: pl.DataFrame, protocol: str,
                      progress: Callable[[dict], None] | None = None) -> tuple[tuple | None, dict]:  # fmt: skip
    """The ranking stage of a trained model, for its version: ``(ranker, tables over the version's item
    rows)``, or ``None`` when it is not kept; and what to record about it.

    ``window``: what the model trained on (its validation split is cut again, as the training cut it);
    ``train_side``: the whole train side, from which the served features are computed."""
    from recsys_assets.ml.buckets import UserBuckets

    if isinstance(train_side, UserBuckets) and len(train_side) > 1:
        return None, {"trained": False, "reason": _BUCKETS_REASON}
    fitted, about = _on_validation(trained, window, tracks, protocol, progress)
    if fitted is None:
        return None, {"trained": False, **about}
    train_side = train_side.collect() if isinstance(train_side, UserBuckets) else train_side
    summary = {
        "trained": True,
        "kept": fitted.useful,
        "val_ndcg@10": round(fitted.val_ndcg, 5),
        "retrieval_val_ndcg@10": round(fitted.val_ndcg_retrieval, 5),
        "gain_ci": [round(v, 5) for v in fitted.gain_ci],
        "epochs": fitted.epochs_per_fold,
        **about,
        "ease_lambda": fitted.ease_lambda,
    }
    if not fitted.useful:
        return None, summary
    return (fitted.ranker, ranker_tables(train_side, tracks, trained.vocab.items, fitted.ease_lambda)), summary
