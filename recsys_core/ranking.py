"""The ranking stage's features and its numpy twin (no TensorFlow): rerank the retrieval's top candidates.

The two-tower model retrieves; a ranker reorders its top ``K`` candidates with what the towers do not
see (the pattern of TFRS's DCN ranking examples):

- the retrieval score, as a z-score within the user's candidates, and its rank;
- the track's popularity on the train side, overall and over its last ``RECENT_DAYS``;
- item-to-item co-occurrence with what the user heard: the sum and the largest of the cosine
  similarities (users in common) between the candidate and each heard track, over each track's
  ``NEIGHBOURS`` nearest (the signal an item-based model such as EASE ranks by);
- the share of the user's plays that went to the candidate's artist;
- how many tracks the user heard.

:class:`RankerTables` holds the per-track tables a version exports; :func:`features` computes a
candidate list's features from them and the user's heard tracks; :class:`DcnRanker` is the trained
network (one cross layer, a ReLU layer, a linear output: ``recsys_assets/ml/ranker.py`` trains it in
Keras) as numpy, the same arithmetic, so that the offline evaluation and ``/recommend`` score alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FEATURES = (
    "retrieval_z",
    "retrieval_rank",
    "log_popularity",
    "log_recent_popularity",
    "cooccurrence_sum",
    "cooccurrence_max",
    "artist_share",
    "log_user_tracks",
)
RANKER_FILE = "ranker.npz"
K_CANDIDATES = 100
NEIGHBOURS = 50
RECENT_DAYS = 7


@dataclass(frozen=True)
class RankerTables:
    """Per-track tables over a list of tracks (the columns of the scores), from one side of the data.

    Attributes:
        log_popularity: log1p of each track's listeners.
        log_recent: log1p of its listeners in the last ``RECENT_DAYS`` of the data.
        neighbours: each track's most similar tracks, as column numbers (-1: none), ``NEIGHBOURS`` wide.
        similarity: their cosine similarities (users in common / √(listeners × listeners)).
        artist: each track's artist, as a code.
    """

    log_popularity: np.ndarray
    log_recent: np.ndarray
    neighbours: np.ndarray
    similarity: np.ndarray
    artist: np.ndarray

    @property
    def n_items(self) -> int:
        return len(self.artist)


def features(tables: RankerTables, heard: list[np.ndarray], candidates: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The features (users × K × ``len(FEATURES)``, float32) of each user's candidates.

    Args:
        tables: the per-track tables.
        heard: each user's heard tracks (column numbers).
        candidates: users × K column numbers, best retrieval score first.
        scores: users × K retrieval scores of ``candidates``.
    """
    n_users, k = candidates.shape
    out = np.empty((n_users, k, len(FEATURES)), dtype=np.float32)
    mean = scores.mean(axis=1, keepdims=True)
    std = scores.std(axis=1, keepdims=True) + 1e-6
    out[..., 0] = (scores - mean) / std
    out[..., 1] = np.arange(k, dtype=np.float32) / k
    out[..., 2] = tables.log_popularity[candidates]
    out[..., 3] = tables.log_recent[candidates]
    total = np.zeros(tables.n_items + 1, dtype=np.float32)  # the last slot takes the -1 padding
    best = np.zeros(tables.n_items + 1, dtype=np.float32)
    n_artists = int(tables.artist.max()) + 1 if tables.n_items else 1
    for u in range(n_users):
        rows = heard[u]
        if len(rows):
            near, sims = tables.neighbours[rows].ravel(), tables.similarity[rows].ravel()
            np.add.at(total, near, sims)
            np.maximum.at(best, near, sims)
            artists = np.bincount(tables.artist[rows], minlength=n_artists) / len(rows)
            out[u, :, 6] = artists[tables.artist[candidates[u]]]
        else:
            out[u, :, 6] = 0.0
        out[u, :, 4] = np.log1p(total[candidates[u]])
        out[u, :, 5] = best[candidates[u]]
        out[u, :, 7] = np.log1p(len(rows))
        if len(rows):
            total[near] = 0.0
            best[near] = 0.0
    return out


@dataclass(frozen=True)
class DcnRanker:
    """A trained deep & cross network as numpy: standardise, one cross layer, ReLU, linear.

    ``x0 = (x - mean) / std``; ``x1 = x0 * (x0 @ cross_kernel + cross_bias) + x0``;
    ``score = relu(x1 @ hidden_kernel + hidden_bias) @ out_kernel + out_bias``.
    """

    mean: np.ndarray
    std: np.ndarray
    cross_kernel: np.ndarray
    cross_bias: np.ndarray
    hidden_kernel: np.ndarray
    hidden_bias: np.ndarray
    out_kernel: np.ndarray
    out_bias: np.ndarray

    def score(self, x: np.ndarray) -> np.ndarray:
        """Scores of features ``x`` (... × ``len(FEATURES)``): one per candidate, higher first."""
        x0 = (x - self.mean) / self.std
        x1 = x0 * (x0 @ self.cross_kernel + self.cross_bias) + x0
        hidden = np.maximum(x1 @ self.hidden_kernel + self.hidden_bias, 0.0)
        return (hidden @ self.out_kernel)[..., 0] + self.out_bias[0]

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def rerank(ranker: DcnRanker, tables: RankerTables, heard: list[np.ndarray], candidates: np.ndarray,
           scores: np.ndarray) -> np.ndarray:  # fmt: skip
    """``candidates`` (users × K) reordered by the ranker, best first."""
    ranked = ranker.score(features(tables, heard, candidates, scores))
    order = np.argsort(-ranked, axis=1, kind="stable")
    return np.take_along_axis(candidates, order, axis=1)


def save(directory: Path, ranker: DcnRanker, tables: RankerTables) -> None:
    """Write the stage into a version directory (``ranker.npz``; the tables over the version's item rows)."""
    np.savez(Path(directory) / RANKER_FILE, **{f"net_{k}": v for k, v in ranker.as_arrays().items()},
             **{f"table_{k}": getattr(tables, k) for k in tables.__dataclass_fields__})  # fmt: skip


def load(directory: Path) -> tuple[DcnRanker, RankerTables] | None:
    """The version's ranking stage, or ``None`` when it has none (a version served in retrieval order)."""
    path = Path(directory) / RANKER_FILE
    if not path.exists():
        return None
    with np.load(path) as stored:
        net = DcnRanker(**{k: stored[f"net_{k}"] for k in DcnRanker.__dataclass_fields__})
        tables = RankerTables(**{k: stored[f"table_{k}"] for k in RankerTables.__dataclass_fields__})
    return net, tables
