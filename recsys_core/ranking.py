"""The ranking stage's features and its numpy twin (no TensorFlow): rerank the retrieval's top candidates.

The two-tower model retrieves; a ranker reorders its top ``K`` candidates with what the towers do not
see (the pattern of TFRS's DCN ranking examples):

- the retrieval score, as a z-score within the user's candidates, and its rank;
- the track's popularity on the train side, overall and over its last ``RECENT_DAYS``, as percentiles
  of the catalogue: the ranker learns from tables of the fit part and is served tables of the whole
  train side, which holds more plays, and more recent ones (the validation users' last plays). A
  count's level shifts between the two; its place in the catalogue much less (on a simulated catalogue,
  log counts turned a validation gain of the stage into a 4% loss on the holdout: docs/benchmarks.md);
- item-to-item co-occurrence with what the user heard: the sum and the largest of the cosine
  similarities (users in common) between the candidate and each heard track, over each track's
  ``NEIGHBOURS`` nearest, for every track of the catalogue;
- the same sum and largest over EASE's item-to-item weights (each heard track's ``NEIGHBOURS``
  largest positive ones), where EASE was fitted: the most-listened tracks, up to a cap
  (``recsys_assets/ml/ranker.py``). EASE's sum is the score an EASE model ranks by, restricted to
  the heaviest weights; on a sparse catalogue that baseline beat the retrieval, and the stage with
  cosine similarities only fell short of it (docs/benchmarks.md);
- the share of the user's plays that went to the candidate's artist;
- how many tracks the user heard.

:class:`RankerTables` holds the per-track tables a version exports; :func:`features` computes a
candidate list's features from them and the user's heard tracks; :class:`DcnRanker` is the trained
networks (one cross layer, a ReLU layer, a linear output; the mean of the cross-fit's networks, which
``recsys_assets/ml/ranker.py`` trains in Keras) as numpy, the same arithmetic, so that the offline
evaluation and ``/recommend`` score alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FEATURES = (
    "retrieval_z",
    "retrieval_rank",
    "popularity",
    "recent_popularity",
    "cooccurrence_sum",
    "cooccurrence_max",
    "ease_sum",
    "ease_max",
    "artist_share",
    "log_user_tracks",
)
_ARTIST_SHARE, _USER_TRACKS = FEATURES.index("artist_share"), FEATURES.index("log_user_tracks")
RANKER_FILE = "ranker.npz"
K_CANDIDATES = 100
NEIGHBOURS = 50
RECENT_DAYS = 7


@dataclass(frozen=True)
class RankerTables:
    """Per-track tables over a list of tracks (the columns of the scores), from one side of the data.

    Attributes:
        popularity: each track's listeners, as its percentile in the catalogue (0 to 1).
        recent_popularity: its listeners in the last ``RECENT_DAYS`` of the data, as a percentile.
        neighbours: each track's most similar tracks, as column numbers (-1: none), ``NEIGHBOURS`` wide.
        similarity: their cosine similarities (users in common / √(listeners × listeners)).
        artist: each track's artist, as a code.
        ease_neighbours: the tracks with each track's largest positive EASE weights (-1: none; a
            track where EASE was not fitted has none), ``NEIGHBOURS`` wide.
        ease_weights: those weights.
    """

    popularity: np.ndarray
    recent_popularity: np.ndarray
    neighbours: np.ndarray
    similarity: np.ndarray
    artist: np.ndarray
    ease_neighbours: np.ndarray
    ease_weights: np.ndarray

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
    out[..., 2] = tables.popularity[candidates]
    out[..., 3] = tables.recent_popularity[candidates]
    total = np.zeros(tables.n_items + 1, dtype=np.float32)  # the last slot takes the -1 padding
    best = np.zeros(tables.n_items + 1, dtype=np.float32)
    n_artists = int(tables.artist.max()) + 1 if tables.n_items else 1
    item_to_item = (
        (tables.neighbours, tables.similarity, FEATURES.index("cooccurrence_sum")),
        (tables.ease_neighbours, tables.ease_weights, FEATURES.index("ease_sum")),
    )  # then its _max
    for u in range(n_users):
        rows = heard[u]
        for neighbours, weights, column in item_to_item:
            if len(rows):
                near, values = neighbours[rows].ravel(), weights[rows].ravel()
                np.add.at(total, near, values)
                np.maximum.at(best, near, values)
            out[u, :, column] = np.log1p(total[candidates[u]])
            out[u, :, column + 1] = best[candidates[u]]
            if len(rows):
                total[near] = 0.0
                best[near] = 0.0
        if len(rows):
            artists = np.bincount(tables.artist[rows], minlength=n_artists) / len(rows)
            out[u, :, _ARTIST_SHARE] = artists[tables.artist[candidates[u]]]
        else:
            out[u, :, _ARTIST_SHARE] = 0.0
        out[u, :, _USER_TRACKS] = np.log1p(len(rows))
    return out


@dataclass(frozen=True)
class DcnRanker:
    """Trained deep & cross networks as numpy, averaged: standardise, one cross layer, ReLU, linear.

    For each member ``m`` (the leading axis of every weight but ``mean`` and ``std``):
    ``x0 = (x - mean) / std``; ``x1 = x0 * (x0 @ cross_kernel[m] + cross_bias[m]) + x0``;
    ``score_m = relu(x1 @ hidden_kernel[m] + hidden_bias[m]) @ out_kernel[m] + out_bias[m]``; the score
    is the members' mean (the cross-fit's networks, one per fold: ``recsys_assets/ml/ranker.py``).
    """

    mean: np.ndarray
    std: np.ndarray
    cross_kernel: np.ndarray  # members × F × F
    cross_bias: np.ndarray  # members × F
    hidden_kernel: np.ndarray  # members × F × H
    hidden_bias: np.ndarray  # members × H
    out_kernel: np.ndarray  # members × H × 1
    out_bias: np.ndarray  # members × 1

    @property
    def members(self) -> int:
        return len(self.out_bias)

    def member(self, m: int) -> DcnRanker:
        """The ``m``-th network alone."""
        return DcnRanker(self.mean, self.std, **{k: getattr(self, k)[m : m + 1] for k in _MEMBER_WEIGHTS})

    def score(self, x: np.ndarray) -> np.ndarray:
        """Scores of features ``x`` (lists × ``len(FEATURES)``, or users × lists × ``len(FEATURES)``): one
        per candidate, higher first."""
        x0 = ((x - self.mean) / self.std)[None]  # 1 × ... × F, against the members' axis
        axes = (1,) * (x.ndim - 1)  # a member's weights broadcast over the leading axes of x

        def dense(inputs: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
            m, f, h = kernel.shape
            return inputs @ kernel.reshape(m, *axes[:-1], f, h) + bias.reshape(m, *axes, h)

        x1 = x0 * dense(x0, self.cross_kernel, self.cross_bias) + x0
        hidden = np.maximum(dense(x1, self.hidden_kernel, self.hidden_bias), 0.0)
        return dense(hidden, self.out_kernel, self.out_bias)[..., 0].mean(axis=0)

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


_MEMBER_WEIGHTS = ("cross_kernel", "cross_bias", "hidden_kernel", "hidden_bias", "out_kernel", "out_bias")


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
        if "table_ease_weights" not in stored:
            # The stage's earlier formats (one network and log counts for the popularity features; then
            # no EASE features) are not what this code computes: such a version is served in
            # retrieval order, and says so.
            log.warning("%s: a ranking stage of an older format; serving the retrieval order", path)
            return None
        net = DcnRanker(**{k: stored[f"net_{k}"] for k in DcnRanker.__dataclass_fields__})
        tables = RankerTables(**{k: stored[f"table_{k}"] for k in RankerTables.__dataclass_fields__})
    return net, tables
