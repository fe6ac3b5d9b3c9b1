"""Model-version directories in the export format, written from arrays, for the scorer's tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from recsys_core.model_version import FORMAT_VERSION
from recsys_core.query_tower import QueryTower


def write_version(
    directory: Path, user_emb: np.ndarray, item_emb: np.ndarray, seen: list[list[int]], **manifest: object
) -> Path:
    """Users ``u1…``, tracks ``t1…`` (row 0 is the out-of-vocabulary slot of both), popularity
    decreasing with the row, ``seen[row]`` the item rows each user row heard; ``manifest`` adds keys."""
    directory.mkdir(parents=True, exist_ok=True)
    users, items = len(user_emb) - 1, len(item_emb) - 1
    pl.DataFrame({"user_id": ["[OOV]", *[f"u{i}" for i in range(1, users + 1)]]}).write_parquet(
        directory / "users.parquet"
    )
    ids = ["[OOV]", *[f"t{i}" for i in range(1, items + 1)]]
    popularity = np.arange(items + 1, dtype=np.float32)[::-1].copy()
    pl.DataFrame({"track_id": ids, "artist_id": "a", "genre": "g", "popularity": popularity}).write_parquet(
        directory / "items.parquet"
    )
    np.save(directory / "user_embeddings.npy", user_emb.astype(np.float32))
    np.save(directory / "item_embeddings.npy", item_emb.astype(np.float32))
    indptr = np.cumsum([0, *map(len, seen)]).astype(np.int64)
    indices = np.array([r for rows in seen for r in rows], dtype=np.int32)
    np.savez(directory / "seen.npz", indptr=indptr, indices=indices)
    (directory / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "data": {}, **manifest}))
    return directory


def tiny_version(directory: Path, seed: int = 0, **manifest: object) -> Path:
    """A servable version of 8 users and 30 tracks (what the control plane's load check accepts)."""
    rng = np.random.default_rng(seed)
    seen = [[], *[sorted(rng.choice(np.arange(1, 31), 3, replace=False).tolist()) for _ in range(8)]]
    return write_version(directory, rng.normal(size=(9, 8)), rng.normal(size=(31, 8)), seen, **manifest)


def with_history(directory: Path, history_length: int, seed: int = 0) -> Path:
    """Make a written version history-aware: random query-tower weights (no features), each user's
    last ``history_length`` tracks from their heard ones, and the user embeddings the tower gives them
    (as the training exports them)."""
    rng = np.random.default_rng(seed)
    users = np.load(directory / "user_embeddings.npy")
    items = np.load(directory / "item_embeddings.npy")
    dim = items.shape[1] - 1  # the last column is the popularity prior's: the query's is a constant 1
    tower = QueryTower(
        user_embedding=users[:, :dim].copy(),
        history_items=items[:, :dim].copy(),
        history_kernel=(rng.normal(size=(dim, dim)) / np.sqrt(dim)).astype(np.float32),
    )
    seen = np.load(directory / "seen.npz")
    history = np.zeros((len(users), history_length), dtype=np.int32)
    for row in range(1, len(users)):
        heard = seen["indices"][seen["indptr"][row] : seen["indptr"][row + 1]][::-1][:history_length]
        history[row, : len(heard)] = heard
    tower.save(directory)
    np.save(directory / "user_history.npy", history)
    np.save(directory / "user_features.npy", np.zeros((len(users), 0), dtype=np.float32))
    np.save(directory / "user_embeddings.npy", tower.embed_all(None, history))
    return directory
