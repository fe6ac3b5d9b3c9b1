"""The history-aware query tower in numpy: a user's embedding computed at request time from their
recent listening, with the weights the training exported (``query_tower.npz`` in the version).

The TensorFlow tower (``recsys_assets.ml.two_tower``) computes

    user_embedding[user] + user_features · W_features + pool(item_embedding[history]) · W_history

where ``pool`` is the recency-weighted mean: the k-th most recent known track weighs ``decay**k``
(``history_decay``; 1 is the plain mean), history row 0 (padding, unknown tracks) left out and not
counted as a position; then it appends the popularity prior's constant 1. This is the same
arithmetic in float32 numpy (a test checks it against the SavedModel to 1e-5), so the serving plane
needs no TensorFlow: at 64 dimensions and 50 history items it is one gather, one weighted mean and
two small matrix-vector products (``benchmarks/query_tower.py``).

Then the **session term** (:meth:`QueryTower.with_session`): the query of a user who has played
something since the version's cutoff moves towards those plays, by ``session_weight`` times its own
norm, along the mean direction of the last ``session_length`` of them (the unit candidate vectors
of their tracks). Trained on in-batch softmax over pairs, the tower learns each user's long-term
taste from the history, not what they are listening to right now (docs/benchmarks.md, "Simulated
CTR@10"); the weight is picked at training on a next-play validation (``0`` where following the
last plays does not predict the next one). It is a step of the scorer, not of the SavedModel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WEIGHTS_FILE = "query_tower.npz"


@dataclass(frozen=True)
class QueryTower:
    user_embedding: np.ndarray  # users × d (row 0: the out-of-vocabulary user)
    # items × d: each track's vector in the history, the candidate tower's id embedding (plus its artist
    # and genre embeddings for a version trained with history_attributes)
    history_items: np.ndarray
    history_kernel: np.ndarray  # d × d
    features_kernel: np.ndarray | None = None  # features × d (None: the tower took no features)
    history_decay: float = 1.0  # the weight of the k-th most recent track is decay**k (1: the plain mean)
    session_weight: float = 0.0  # the session term's weight (0: off; versions before it had none)
    session_length: int = 0  # the session term's last plays

    @classmethod
    def load(cls, directory: Path) -> QueryTower | None:
        """The version's tower, or ``None`` for a version trained without history."""
        path = Path(directory) / WEIGHTS_FILE
        if not path.exists():
            return None
        with np.load(path) as weights:
            kernel = weights["features_kernel"] if "features_kernel" in weights.files else None
            return cls(
                weights["user_embedding"].astype(np.float32),
                weights["history_items"].astype(np.float32),
                weights["history_kernel"].astype(np.float32),
                None if kernel is None else kernel.astype(np.float32),
                # Versions written before the recency weighting pooled with the plain mean.
                float(weights["history_decay"]) if "history_decay" in weights.files else 1.0,
                float(weights["session_weight"]) if "session_weight" in weights.files else 0.0,
                int(weights["session_length"]) if "session_length" in weights.files else 0,
            )

    def save(self, directory: Path) -> None:
        arrays = {"user_embedding": self.user_embedding, "history_items": self.history_items,
                  "history_kernel": self.history_kernel,
                  "history_decay": np.float32(self.history_decay),
                  "session_weight": np.float32(self.session_weight),
                  "session_length": np.int32(self.session_length)}  # fmt: skip
        if self.features_kernel is not None:
            arrays["features_kernel"] = self.features_kernel
        np.savez(Path(directory) / WEIGHTS_FILE, **arrays)

    def embed(self, user_row: int, features: np.ndarray | None, history: np.ndarray) -> np.ndarray:
        """One query embedding (with the prior's trailing 1). ``history``: item rows, most recent
        first; rows ≤ 0 are ignored. The same arithmetic as :meth:`embed_many` (it is one row of it)."""
        rows = np.asarray(history)
        rows = rows[rows > 0][None, :]
        feats = None if features is None else np.asarray(features, dtype=np.float32)[None, :]
        return self.embed_many(np.array([user_row]), feats, rows)[0]

    def embed_many(self, user_rows: np.ndarray, features: np.ndarray | None, histories: np.ndarray) -> np.ndarray:
        """Query embeddings of ``user_rows`` (users × d+1): ``features`` (users × f or ``None``) and
        ``histories`` (users × N item rows, 0-padded) row by row."""
        x = self.user_embedding[user_rows]  # a copy (fancy indexing)
        if self.features_kernel is not None and features is not None:
            x += features.astype(np.float32, copy=False) @ self.features_kernel
        if histories.shape[1]:
            weights = self.history_weights(histories)
            total = np.maximum(weights.sum(axis=1, keepdims=True), 1.0)  # ≥ 1 unless the history is empty
            pooled = np.einsum("un,und->ud", weights, self.history_items[np.maximum(histories, 0)]) / total
            x += pooled @ self.history_kernel
        return np.hstack([x, np.ones((len(x), 1), dtype=np.float32)])

    def history_weights(self, histories: np.ndarray) -> np.ndarray:
        """The pooling weights of ``histories`` (users × N, most recent first): ``decay**k`` for the
        k-th known track (rows > 0, counted from 0), 0 for padding and unknown tracks."""
        mask = histories > 0
        if self.history_decay == 1.0:
            return mask.astype(np.float32)
        position = np.cumsum(mask, axis=1) - 1
        powers = np.float32(self.history_decay) ** np.arange(histories.shape[1], dtype=np.float32)
        return np.where(mask, powers[np.maximum(position, 0)], np.float32(0.0))

    def with_session(self, query: np.ndarray, played: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """``query`` (d + 1, the prior's 1 last) moved towards the session: ``+ session_weight · ‖x‖ ·`` the
        mean of the unit candidate vectors (``directions``: :func:`unit_directions` of the version's
        item embeddings) of the first ``session_length`` known rows of ``played`` (item rows since the
        cutoff, most recent first; rows ≤ 0 skipped), ``x`` the query without the prior's 1. Nothing
        played, or a weight of 0: the query itself. About 0.01 ms: it runs per request."""
        rows = np.asarray(played)
        rows = rows[rows > 0][: self.session_length]
        if not self.session_weight or not len(rows):
            return query
        out = np.array(query, dtype=np.float32)  # a copy: the caller's query is not written to
        x = out[:-1]
        x += np.float32(self.session_weight * math.sqrt(float(x @ x)) / len(rows)) * directions[rows].sum(axis=0)
        return out

    def embed_all(self, features: np.ndarray | None, histories: np.ndarray, chunk: int = 8192) -> np.ndarray:
        """Every user's embedding from their exported features and history (what a version's users are
        served with until they play something new), ``chunk`` users at a time to bound the memory."""
        n = len(self.user_embedding)
        out = np.empty((n, self.user_embedding.shape[1] + 1), dtype=np.float32)
        for start in range(0, n, chunk):
            rows = np.arange(start, min(start + chunk, n))
            out[rows] = self.embed_many(rows, None if features is None else features[rows], histories[rows])
        return out


def unit_directions(item_embeddings: np.ndarray) -> np.ndarray:
    """Each item's candidate vector without the prior's column, scaled to unit length (zeros stay
    zeros): what :meth:`QueryTower.with_session` averages."""
    vectors = np.asarray(item_embeddings, dtype=np.float32)[:, :-1]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.where(norms > 0, norms, 1.0))


def merged_history(played: np.ndarray, exported: np.ndarray, n: int) -> np.ndarray:
    """A user's history for the tower: ``played`` (known item rows since the cutoff, most recent first)
    before the ``exported`` history at the cutoff (a track already in it keeps its place: the history
    orders tracks by first play, as the training did), ``n`` rows at most."""
    exported = exported[exported > 0]
    return np.concatenate([played[~np.isin(played, exported)], exported])[:n]
