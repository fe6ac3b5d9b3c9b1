"""One model version as a unit on disk: exported, loaded, scored, all together.

A version directory holds:

| file | what |
|---|---|
| ``manifest.json`` | format version, hyperparameters, training cutoff and row counts, data hash, dims, query genres |
| ``users.parquet`` / ``user_embeddings.npy`` | known users (row order) and their embeddings |
| ``user_features.npy`` | the query tower's features of those users at training time |
| ``items.parquet`` / ``item_embeddings.npy`` | ranked tracks (track, artist, genre, popularity) and their embeddings |
| ``seen.npz`` | each user's training tracks (CSR over item rows): filtered out of recommendations |
| ``query_tower/`` | SavedModel: ``{user_id, user_features}`` → embedding (string lookup inside) |
| ``index/`` | SavedModel: ``tfrs.layers.factorized_top_k.BruteForce`` over the item embeddings |

Serving needs only the numpy files (no TensorFlow import, so a new version loads in milliseconds);
the SavedModels are there for TensorFlow Serving and for users who compute embeddings of new users.
Row 0 of the user and item tables is the out-of-vocabulary slot and is never recommended.
"""

from __future__ import annotations

import json
import os
import shutil
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

    # --- scoring for the offline evaluation -----------------------------------------------------

    def scorer(self, eval_items: np.ndarray):
        """A scorer over ``eval_items`` (track ids) for :func:`recsys_assets.ml.metrics.evaluate`.

        Tracks the model does not know score -inf (ranked last); users it does not know get its
        popularity fallback, as serving would give them.
        """
        table = pl.DataFrame({"track_id": self.item_ids[1:].astype(str), "row": np.arange(1, len(self.item_ids))})
        rows = (
            pl.DataFrame({"track_id": pl.Series(eval_items).cast(pl.String)})
            .join(table, on="track_id", how="left", maintain_order="left")["row"]
            .fill_null(0)
            .to_numpy()
        )
        candidates = self.item_embeddings[rows]
        unknown_item = rows == 0
        popularity = np.where(unknown_item, -np.inf, self.item_popularity[rows]).astype(np.float32)

        def score(users: np.ndarray) -> np.ndarray:
            user_rows = np.array([self.user_row(str(u)) for u in users])
            scores = self.user_embeddings[user_rows] @ candidates.T
            scores[:, unknown_item] = -np.inf
            unknown_user = user_rows == 0
            if unknown_user.any():
                scores[unknown_user] = popularity
            return scores

        return score

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


def export_model(trained, train_pairs: pl.DataFrame, manifest: dict, path: Path, k: int = 100) -> ModelArtifact:
    """Write a trained two-tower model as one version directory, atomically.

    Args:
        trained: a :class:`recsys_assets.ml.two_tower.TrainedTwoTower`.
        train_pairs: the train side's (user_id, track_id) pairs (the seen lists and the popularity).
        manifest: what to record (data lineage, metrics…); format and dims are added.
        path: the version directory (must not exist).
        k: the top-k of the exported BruteForce index.
    """
    from recsys_assets.ml.two_tower import Vocabulary

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vocab = trained.vocab
    pairs = train_pairs.select("user_id", "track_id").unique()
    item_rows = Vocabulary.index(pairs["track_id"], vocab.items)
    user_rows = Vocabulary.index(pairs["user_id"], vocab.users)
    listeners = np.bincount(item_rows, minlength=len(vocab.items)).astype(np.float32)
    listeners[0] = 0.0
    order = np.lexsort((item_rows, user_rows))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(user_rows, minlength=len(vocab.users)))])

    pl.DataFrame({"user_id": vocab.users.astype(str)}).write_parquet(tmp / "users.parquet")
    items = trained.item_frame
    pl.DataFrame(
        {
            "track_id": vocab.items.astype(str),
            "artist_id": ["", *items["artist_id"].to_list()],
            "genre": ["", *items["genre"].to_list()],
            "popularity": listeners / max(len(vocab.users) - 1, 1),
        }
    ).write_parquet(tmp / "items.parquet")
    np.save(tmp / "user_embeddings.npy", trained.user_embeddings)
    np.save(tmp / "item_embeddings.npy", trained.item_embeddings)
    np.save(tmp / "user_features.npy", trained.user_features)
    np.savez(tmp / "seen.npz", indptr=indptr.astype(np.int64), indices=item_rows[order].astype(np.int32))
    _export_savedmodels(trained, tmp, k)
    full = {
        **manifest,
        "format_version": FORMAT_VERSION,
        "embedding_dim": int(trained.user_embeddings.shape[1]),
        "users": len(vocab.users) - 1,
        "items": len(vocab.items) - 1,
        "query_genres": vocab.query_genres,
        "index_k": k,
    }
    (tmp / "manifest.json").write_text(json.dumps(full, indent=2, default=str))
    if path.exists():
        raise FileExistsError(f"{path} already exists: a model version is never overwritten")
    os.replace(tmp, path)
    return ModelArtifact.load(path)


def _export_savedmodels(trained, directory: Path, k: int) -> None:
    """The query tower (string keys in) and a BruteForce top-k index, as SavedModels."""
    import tensorflow as tf
    import tensorflow_recommenders as tfrs

    vocab = trained.vocab
    n_features = trained.user_features.shape[1]
    core = trained.model.query_tower

    class ServingQueryTower(tf.keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.lookup = tf.keras.layers.StringLookup(vocabulary=list(vocab.users[1:].astype(str)), num_oov_indices=1)
            self.core = core

        def call(self, inputs):
            embedding = self.core(
                {"user_row": self.lookup(inputs["user_id"]), "user_features": inputs["user_features"]}
            )
            # The popularity prior's extra dimension (see two_tower.with_prior): always 1 on the query side.
            return tf.concat([embedding, tf.ones_like(embedding[:, :1])], axis=1)

    tower = ServingQueryTower()
    example = {"user_id": tf.constant([str(vocab.users[1])]), "user_features": tf.zeros((1, n_features))}
    tower(example)
    signature = {
        "user_id": tf.TensorSpec([None], tf.string, name="user_id"),
        "user_features": tf.TensorSpec([None, n_features], tf.float32, name="user_features"),
    }
    tf.saved_model.save(
        tower,
        str(directory / "query_tower"),
        signatures=tf.function(lambda x: {"embedding": tower(x)}).get_concrete_function(signature),
    )

    index = tfrs.layers.factorized_top_k.BruteForce(tower, k=min(k, len(vocab.items) - 1))
    ids = tf.constant(vocab.items[1:].astype(str))
    index.index(tf.constant(trained.item_embeddings[1:]), ids)
    index(example)
    tf.saved_model.save(index, str(directory / "index"))
