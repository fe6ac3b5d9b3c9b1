"""One model version as a unit on disk: exported, loaded, scored, all together.

A version directory holds:

| file | what |
|---|---|
| ``manifest.json`` | format version, hyperparameters, training cutoff and row counts, data hash, dims, query genres |
| ``users.parquet`` / ``user_embeddings.npy`` | known users (row order) and their embeddings |
| ``user_features.npy`` | the query tower's features of those users at training time |
| ``user_history.npy`` | with ``history_length`` N > 0: each user's last N tracks at the cutoff (item rows) |
| ``query_tower.npz`` | with N > 0: the query tower's weights for :mod:`recsys_core.query_tower` (numpy) |
| ``items.parquet`` / ``item_embeddings.npy`` | ranked tracks (track, artist, genre, popularity) and their embeddings |
| ``seen.npz`` | each user's training tracks (CSR over item rows): filtered out of recommendations |
| ``query_tower/`` | SavedModel: ``{user_id, user_features[, history]}`` → embedding (string lookups inside) |
| ``index/`` | SavedModel: ``tfrs.layers.factorized_top_k.BruteForce`` over the item embeddings |
| ``ann/`` | from ``RECSYS_ANN_MIN_ITEMS`` tracks on: a FAISS IVF index of the item embeddings (``recsys_core.ann``) |

Serving needs only the numpy files (no TensorFlow import, so a new version loads in milliseconds);
the SavedModels are there for TensorFlow Serving and for users who compute embeddings of new users.
This module reads the format; ``recsys_assets.ml.export`` (TensorFlow) writes it.
Row 0 of the user and item tables is the out-of-vocabulary slot and is never recommended.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

FORMAT_VERSION = 1
POPULAR_FALLBACK = 500


@dataclass
class ModelArtifact:
    path: Path
    manifest: dict
    user_ids: np.ndarray
    user_embeddings: np.ndarray
    item_ids: np.ndarray
    item_artists: np.ndarray
    item_embeddings: np.ndarray
    item_popularity: np.ndarray
    seen_indptr: np.ndarray
    seen_indices: np.ndarray
    _user_rows: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._user_rows = {u: i for i, u in enumerate(self.user_ids) if i > 0}

    # --- identity -----------------------------------------------------------------------------

    @property
    def cutoff(self) -> str | None:
        return self.manifest.get("data", {}).get("cutoff")

    @property
    def training_rows(self) -> int:
        return int(self.manifest.get("data", {}).get("train_interactions", 0))

    def user_row(self, user_id: str) -> int:
        """The user's row (0 when the model does not know the user)."""
        return self._user_rows.get(user_id, 0)

    def seen(self, row: int) -> np.ndarray:
        return self.seen_indices[self.seen_indptr[row] : self.seen_indptr[row + 1]]

    @property
    def popular_rows(self) -> np.ndarray:
        """Item rows by decreasing popularity (the fallback for unknown users)."""
        order = np.argsort(-self.item_popularity[1:], kind="stable") + 1
        return order[:POPULAR_FALLBACK]

    # --- persistence ----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path) -> ModelArtifact:
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"{path} is not a model version (no manifest.json)")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: model format {manifest.get('format_version')}, this code reads {FORMAT_VERSION}")
        users = pl.read_parquet(path / "users.parquet")
        items = pl.read_parquet(path / "items.parquet")
        seen = np.load(path / "seen.npz")
        return cls(
            path=path,
            manifest=manifest,
            user_ids=users["user_id"].to_numpy().astype(object),
            user_embeddings=np.load(path / "user_embeddings.npy"),
            item_ids=items["track_id"].to_numpy().astype(object),
            item_artists=items["artist_id"].to_numpy().astype(object),
            item_embeddings=np.load(path / "item_embeddings.npy"),
            item_popularity=items["popularity"].to_numpy().astype(np.float32),
            seen_indptr=seen["indptr"],
            seen_indices=seen["indices"],
        )
