"""The one scorer: brute-force top-k over a model version's exported embeddings (numpy, no TensorFlow).

``/recommend`` (the BentoML service), the registered MLflow pyfunc (``pyfunc_model.py``), the raw
Starlette baseline of the serving benchmark and the offline evaluation (:meth:`Ranker.scorer`) all
score with :class:`Ranker`; a test checks that the offline evaluation's top-k equals ``/recommend``'s,
item for item. From ``RECSYS_ANN_MIN_ITEMS`` tracks on, ``/recommend`` finds its candidates through the
version's ANN index (``recsys_core.ann``) and the offline evaluation stays exact: they then agree up to
the index's recall (≥ 0.95 by design, measured in docs/benchmarks.md).

With a history-aware version (``query_tower.npz``), the user vectors are the numpy query tower's
(:mod:`recsys_core.query_tower`) over each user's exported features and history at the training
cutoff, computed once at load; a request that brings the user's plays since then (``recent``: the
service's user state) gets its query from the same tower over those plays and the exported history,
moved towards those plays by the version's session term, and those plays are filtered out like the
training's. The offline evaluation scores the same vectors:
what it measures is what a user without new plays is served.

With a ranking stage (``ranker.npz``, :mod:`recsys_core.ranking`), the retrieval's top
``K_CANDIDATES`` (or ``k``, if more) are reordered by the version's ranker, and the scores are the
ranker's; the offline scorer reorders the same candidates the same way.

The hot path of ``/recommend``: one matrix-vector product over the item embeddings, the user's
already-heard tracks masked out, and a partition for the k-th best score. It allocates two vectors of
the catalogue's size per request (the scores and the partition's copy) and nothing else. Measured on
10,000 tracks × 64 dimensions (``benchmarks/serving.py``): the item matrix stored transposed
(dimensions × tracks, so BLAS streams it row by row) takes the product from 77 to 51 µs, and
selecting by threshold (``partition`` of the values, then the indices above the k-th) beats
``argpartition`` by about 20 µs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys_core.ann import DEFAULT_MIN_ITEMS, INDEX_FILE, AnnIndex
from recsys_core.model_version import ModelArtifact
from recsys_core.query_tower import QueryTower, merged_history, unit_directions
from recsys_core.ranking import K_CANDIDATES, features
from recsys_core.ranking import load as load_ranking_stage

# A user who heard more tracks than this is ranked exactly even when an index is there: the index
# would have to over-fetch them all.
MAX_ANN_OVERFETCH = 1_000
_NO_ROWS = np.empty(0, dtype=np.int64)


def single_threaded_blas() -> None:
    """One BLAS thread per process: a 10,000 × 64 matrix-vector product is faster on one core than
    split across two that the web server and the load are already using (measured: 6× on the
    service's throughput). Parallelism comes from workers and concurrent requests instead. A server
    calls it once at start (not the :class:`Ranker`: a pyfunc loaded in a notebook keeps its BLAS)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def _check_shapes(artifact: ModelArtifact, version: int) -> None:
    """Refuse a version whose files disagree (a truncated upload, a half-written copy): it would load,
    pass a smoke query, then fail or mis-rank requests."""
    checks = {
        "item_embeddings.npy rows": (len(artifact.item_embeddings), len(artifact.item_ids), "items.parquet rows"),
        "user_embeddings.npy rows": (len(artifact.user_embeddings), len(artifact.user_ids), "users.parquet rows"),
        "seen.npz users": (len(artifact.seen_indptr) - 1, len(artifact.user_ids), "users.parquet rows"),
    }
    for what, (found, expected, against) in checks.items():
        if found != expected:
            raise ValueError(f"model version {version}: {what} = {found}, {against} = {expected}")
    ann = artifact.manifest.get("ann")
    if ann is not None and int(ann.get("items", -1)) != len(artifact.item_ids) - 1:
        raise ValueError(f"model version {version}: its ANN index holds {ann.get('items')} tracks, "
                         f"items.parquet {len(artifact.item_ids) - 1}")  # fmt: skip
    if len(artifact.seen_indices) and int(artifact.seen_indices.max()) >= len(artifact.item_ids):
        raise ValueError(f"model version {version}: seen.npz names item row {int(artifact.seen_indices.max())}, "
                         f"the version has {len(artifact.item_ids)}")  # fmt: skip


def _check_tower(tower: QueryTower, artifact: ModelArtifact, version: int) -> None:
    """Refuse a history-aware version whose query tower does not fit its tables (a version whose
    embeddings were replaced by hand and its ``query_tower.npz`` left behind, a half-written copy)."""
    dim = tower.user_embedding.shape[1]
    checks = {
        "query_tower.npz user rows": (len(tower.user_embedding), len(artifact.user_ids), "users.parquet rows"),
        "query_tower.npz item rows": (len(tower.history_items), len(artifact.item_ids), "items.parquet rows"),
        "query_tower.npz dimensions + 1": (dim + 1, artifact.item_embeddings.shape[1], "item_embeddings.npy columns"),
        "query_tower.npz history kernel": (tower.history_kernel.shape, (dim, dim), "the tower's dimensions"),
    }
    for what, (found, expected, against) in checks.items():
        if found != expected:
            raise ValueError(f"model version {version}: {what} = {found}, {against} = {expected}")


@dataclass(frozen=True)
class Recommendation:
    track_ids: list[str]
    artist_ids: list[str]
    scores: list[float]
    fallback: bool
    personalised_from_history: bool = False  # a user the version does not know, ranked from their plays


class Ranker:
    """Recommendations from one model version.

    Args:
        artifact: the loaded version directory.
        version: the registry version it came from (``0`` for a directory loaded by hand).
        ann_min_items: from this many tracks on, the version's ANN index (if it has one) finds the
            candidates (``recsys_core.ann``); below it, brute force.
    """

    def __init__(self, artifact: ModelArtifact, version: int, ann_min_items: int = DEFAULT_MIN_ITEMS):
        _check_shapes(artifact, version)
        self.artifact = artifact
        self.version = version
        # Contiguous float32 copies; the items transposed (see the module docstring).
        self._items_t = np.ascontiguousarray(np.asarray(artifact.item_embeddings, dtype=np.float32).T)
        self.users = np.ascontiguousarray(artifact.user_embeddings, dtype=np.float32)
        self.item_ids = artifact.item_ids
        self.item_artists = artifact.item_artists
        self._popular = artifact.popular_rows
        self._popularity = artifact.item_popularity
        entry = artifact.manifest.get("ann")
        use_index = entry is not None and self.n_items >= ann_min_items
        if use_index and not (artifact.path / INDEX_FILE).exists():
            raise ValueError(f"model version {version}: its manifest names an ANN index, {INDEX_FILE} is missing")
        self.ann = AnnIndex.load(artifact.path, entry) if use_index else None
        self.tower = QueryTower.load(artifact.path)
        self._directions: np.ndarray | None = None  # the session term's (with_session), when the version has one
        if self.tower is not None:
            _check_tower(self.tower, artifact, version)
            self._features = np.load(artifact.path / "user_features.npy").astype(np.float32)
            self._history = np.load(artifact.path / "user_history.npy").astype(np.int64)
            for name, table in (("user_features.npy", self._features), ("user_history.npy", self._history)):
                if len(table) != len(artifact.user_ids):
                    raise ValueError(f"model version {version}: {name} rows = {len(table)}, "
                                     f"users.parquet rows = {len(artifact.user_ids)}")  # fmt: skip
            self.users = self.tower.embed_all(self._features if self.tower.features_kernel is not None else None,
                                              self._history)  # fmt: skip
            self._item_rows = {t: i for i, t in enumerate(self.item_ids) if i}
            self._directions = unit_directions(artifact.item_embeddings) if self.tower.session_weight else None
        self.stage = load_ranking_stage(artifact.path)
        if self.stage is not None and self.stage[1].n_items != len(self.item_ids):
            raise ValueError(f"model version {version}: ranker.npz has {self.stage[1].n_items} item rows, "
                             f"items.parquet {len(self.item_ids)}")  # fmt: skip

    @classmethod
    def load(cls, path: Path, version: int, ann_min_items: int = DEFAULT_MIN_ITEMS) -> Ranker:
        return cls(ModelArtifact.load(path), version, ann_min_items)

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def history_length(self) -> int:
        """N of the version's query tower (0: a version without history, whose users are static)."""
        return self._history.shape[1] if self.tower is not None else 0

    def query(self, user_id: str, recent: Sequence[str] = ()) -> tuple[np.ndarray | None, np.ndarray]:
        """The user's query vector (``None``: nobody to personalise for) and the item rows of ``recent``.

        ``recent``: the user's positive tracks since the version's cutoff, most recent first. Those
        the version knows go before the exported history (a track already in it keeps its place: the
        history orders tracks by first play, as the training did), N at most, through the tower; then
        the query moves towards them by the version's session term (``QueryTower.with_session``).
        """
        row = self.artifact.user_row(user_id)
        played = _NO_ROWS
        if self.tower is not None and recent:
            played = np.fromiter((self._item_rows.get(t, 0) for t in recent), dtype=np.int64, count=len(recent))
            played = played[played > 0]
        if not len(played):
            return (self.users[row] if row else None), played
        history = merged_history(played, self._history[row], self.history_length)
        features = self._features[row] if self.tower.features_kernel is not None else None
        query = self.tower.embed(row, features, history)
        if self._directions is not None:
            query = self.tower.with_session(query, played, self._directions)
        return query, played

    def top_rows(self, user_id: str, k: int, recent: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray, bool]:
        """Item rows and scores of the top ``k`` for ``user_id``; popularity for users it cannot
        personalise for (unknown to the version, and no ``recent`` play it knows)."""
        query, played = self.query(user_id, recent)
        if query is None:
            top = self._popular[:k]
            return top, self._popularity[top], True
        seen = self.artifact.seen(self.artifact.user_row(user_id))
        if len(played):
            seen = np.union1d(seen, played)
        if self.stage is None:
            return (*self._retrieve(query, seen, k), False)
        rows, scores = self._retrieve(query, seen, max(k, K_CANDIDATES))
        if not len(rows):
            return rows, scores, False
        net, tables = self.stage
        ranked = net.score(features(tables, [seen], rows[None], scores[None]))[0]
        order = np.argsort(-ranked, kind="stable")[:k]
        return rows[order], ranked[order].astype(np.float32), False

    def _retrieve(self, query: np.ndarray, seen: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The retrieval's top ``k`` rows and scores for ``query``, ``seen`` left out."""
        if self.ann is not None and len(seen) <= MAX_ANN_OVERFETCH:
            return self._top_rows_ann(query, seen, k)
        scores = self._items_t.T @ query
        scores[0] = -np.inf
        scores[seen] = -np.inf
        k = min(k, self.n_items - len(seen))
        if k <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        kth = np.partition(scores, -k)[-k]
        candidates = np.flatnonzero(scores >= kth)  # k rows, more on ties with the k-th
        top = candidates[np.argsort(-scores[candidates], kind="stable")[:k]]  # ties: the lower row first
        return top, scores[top]

    def _top_rows_ann(self, query: np.ndarray, seen: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's candidates, over-fetched by the heard tracks, those filtered out, the rest
        re-scored exactly (so what is served is ordered and scored as brute force would)."""
        found = self.ann.search(query, k + len(seen))
        found = found[~np.isin(found, seen)][:k]
        scores = query @ self._items_t[:, found]
        order = np.lexsort((found, -scores))  # ties: the lower row first, as brute force
        return found[order], scores[order]

    def scorer(self, eval_items: np.ndarray):
        """The scores of ``eval_items`` (track ids) for :func:`recsys_assets.ml.metrics.evaluate`: the
        same user and item vectors as :meth:`top_rows`, over the evaluation's candidate set.

        Tracks the model does not know score -inf (ranked last); users it does not know get the
        popularity fallback, as :meth:`top_rows` gives them. Already-heard tracks are the
        evaluation's to mask (it knows the train side).
        """
        table = pl.DataFrame({"track_id": self.item_ids[1:].astype(str), "row": np.arange(1, len(self.item_ids))})
        rows = (
            pl.DataFrame({"track_id": pl.Series(eval_items).cast(pl.String)})
            .join(table, on="track_id", how="left", maintain_order="left")["row"]
            .fill_null(0)
            .to_numpy()
        )
        candidates_t = np.ascontiguousarray(self._items_t[:, rows])
        unknown_item = rows == 0
        popularity = np.where(unknown_item, -np.inf, self._popularity[rows]).astype(np.float32)

        def score(users: np.ndarray) -> np.ndarray:
            user_rows = np.array([self.artifact.user_row(str(u)) for u in users], dtype=np.int64)
            scores = self.users[user_rows] @ candidates_t
            scores[:, unknown_item] = -np.inf
            unknown_user = user_rows == 0
            if unknown_user.any():
                scores[unknown_user] = popularity
            if self.stage is not None:
                for i in np.flatnonzero(~unknown_user):
                    self._rerank_row(scores[i], rows, self.artifact.seen(user_rows[i]))
            return scores

        return score

    def _rerank_row(self, scores: np.ndarray, rows: np.ndarray, seen: np.ndarray) -> None:
        """Reorder, in place, one user's offline scores (columns: item ``rows``) as :meth:`top_rows` would:
        the ranker's order of the retrieval's top ``K_CANDIDATES`` unheard columns, above every other."""
        free = np.isfinite(scores) & ~np.isin(rows, seen) & (rows > 0)
        columns = np.flatnonzero(free)
        if not len(columns):
            return
        columns = columns[np.lexsort((rows[columns], -scores[columns]))[:K_CANDIDATES]]  # as _retrieve
        net, tables = self.stage
        ranked = net.score(features(tables, [seen], rows[columns][None], scores[columns][None]))[0]
        order = np.argsort(-ranked, kind="stable")
        top = scores[free].max() + 1.0
        scores[columns[order]] = top + np.arange(len(order), 0, -1, dtype=np.float32)

    def recommend(self, user_id: str, k: int, recent: Sequence[str] = ()) -> Recommendation:
        rows, scores, fallback = self.top_rows(user_id, k, recent)
        return Recommendation(
            track_ids=self.item_ids[rows].tolist(),  # object arrays of str: tolist() gives the str themselves
            artist_ids=self.item_artists[rows].tolist(),
            scores=scores.astype(np.float64).tolist(),
            fallback=fallback,
            personalised_from_history=not fallback and bool(recent) and self.artifact.user_row(user_id) == 0,
        )

    def smoke_test(self) -> None:
        """Recommend once for a known user and once for an unknown one; raise if anything is off."""
        if self.n_items < 1:
            raise ValueError(f"model version {self.version} has no items")
        known = str(self.artifact.user_ids[1]) if len(self.artifact.user_ids) > 1 else None
        for user in filter(None, (known, "\u0000smoke-test-unknown-user")):
            rec = self.recommend(user, 5)
            if not rec.track_ids or not all(np.isfinite(rec.scores)):
                raise ValueError(f"model version {self.version} gave no finite recommendation for {user!r}")
