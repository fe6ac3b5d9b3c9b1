"""Export a trained two-tower model as one model version directory (the format:
:mod:`recsys_core.model_version`, which serving reads without TensorFlow)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl

from recsys_assets.ml.buckets import UserBuckets
from recsys_core import ann, ranking
from recsys_core.ann import DEFAULT_MIN_ITEMS
from recsys_core.model_version import FORMAT_VERSION, ModelArtifact


def export_model(
    trained,
    train_pairs: pl.DataFrame | UserBuckets,
    manifest: dict,
    path: Path,
    k: int = 100,
    ann_min_items: int = DEFAULT_MIN_ITEMS,
    ranking_stage: tuple | None = None,
) -> ModelArtifact:
    """Write a trained two-tower model as one version directory, atomically.

    Args:
        trained: a :class:`recsys_assets.ml.two_tower.TrainedTwoTower`.
        train_pairs: the train side's (user_id, track_id) pairs (the seen lists and the popularity): the
            whole train side, also when the model trained on a window of it; a table or its user buckets.
        manifest: what to record (data lineage, metrics…); format and dims are added.
        path: the version directory (must not exist).
        k: the top-k of the exported BruteForce index.
        ann_min_items: from this many tracks on, an ANN index is built into the version
            (:mod:`recsys_core.ann`).
        ranking_stage: the trained ranker (a :class:`recsys_core.ranking.DcnRanker`) and its tables over
            the version's item rows, written as ``ranker.npz``; ``None``: served in retrieval order.
    """
    from recsys_assets.ml.two_tower import Vocabulary

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vocab = trained.vocab
    # The model's users only: a user of the train side that a training window left out is unknown to
    # the version (served the popular tracks, as a new user is), so their tracks must not pile up in
    # the out-of-vocabulary row's seen list.
    known = pl.DataFrame({"user_id": vocab.users[1:].astype(str)})
    rows = []  # (user row, item row) of each distinct pair, one user bucket at a time: 8 bytes a pair
    for part in train_pairs if isinstance(train_pairs, UserBuckets) else (train_pairs,):
        pairs = part.select("user_id", "track_id").unique().join(known, on="user_id", how="semi")
        rows.append((Vocabulary.index(pairs["user_id"], vocab.users), Vocabulary.index(pairs["track_id"], vocab.items)))
    user_rows = np.concatenate([u for u, _ in rows]).astype(np.int32)
    item_rows = np.concatenate([i for _, i in rows]).astype(np.int32)
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
    if trained.user_history is not None:  # item rows, most recent first: the users' state at the cutoff
        np.save(tmp / "user_history.npy", trained.user_history)
        trained.query_tower().save(tmp)
    np.savez(tmp / "seen.npz", indptr=indptr.astype(np.int64), indices=item_rows[order].astype(np.int32))
    _export_savedmodels(trained, tmp, k)
    full = {
        **manifest,
        "format_version": FORMAT_VERSION,
        "embedding_dim": int(trained.user_embeddings.shape[1]),
        "users": len(vocab.users) - 1,
        "items": len(vocab.items) - 1,
        "query_genres": vocab.query_genres,
        "history_length": int(trained.params.history_length),
        "history_decay": float(trained.params.history_decay),
        "session_weight": float(trained.session_weight),
        "session_length": int(trained.params.session_length if trained.session_weight else 0),
        "index_k": k,
    }
    if ranking_stage is not None:
        ranking.save(tmp, *ranking_stage)
        full["ranker"] = True
    if len(vocab.items) - 1 >= ann_min_items:
        full["ann"] = ann.build(trained.item_embeddings, tmp)
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
    n_history = trained.params.history_length
    core = trained.model.query_tower

    class ServingQueryTower(tf.keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.lookup = tf.keras.layers.StringLookup(vocabulary=list(vocab.users[1:].astype(str)), num_oov_indices=1)
            # A history's track ids (most recent first, "" for padding: row 0, left out of the mean).
            self.tracks = tf.keras.layers.StringLookup(vocabulary=list(vocab.items[1:].astype(str)), num_oov_indices=1)
            self.core = core

        def call(self, inputs):
            query = {"user_row": self.lookup(inputs["user_id"]), "user_features": inputs["user_features"]}
            if n_history:
                query["history"] = self.tracks(inputs["history"])
            embedding = self.core(query)
            # The popularity prior's extra dimension (see two_tower.with_prior): always 1 on the query side.
            return tf.concat([embedding, tf.ones_like(embedding[:, :1])], axis=1)

    tower = ServingQueryTower()
    example = {"user_id": tf.constant([str(vocab.users[1])]), "user_features": tf.zeros((1, n_features))}
    signature = {
        "user_id": tf.TensorSpec([None], tf.string, name="user_id"),
        "user_features": tf.TensorSpec([None, n_features], tf.float32, name="user_features"),
    }
    if n_history:
        example["history"] = tf.fill((1, n_history), "")
        signature["history"] = tf.TensorSpec([None, n_history], tf.string, name="history")
    tower(example)
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
