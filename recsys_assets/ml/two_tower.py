"""The TensorFlow Recommenders two-tower retrieval model (plain module: no Dagster).

- Query tower: user id embedding and the user's features (genre shares of their training-window
  positives, activity, like share) → a dense projection; with ``history_length`` N > 0, also the
  user's last N distinct positive tracks before the example (:mod:`recsys_assets.ml.history`), their
  item embeddings (shared with the candidate tower; with ``history_attributes``, their artist and
  genre embeddings too) averaged with recency weights and projected.
- Candidate tower: track id, artist and genre embeddings → a dense projection.
- ``tfrs.tasks.Retrieval`` with in-batch negatives, a logQ correction for the popularity of in-batch
  candidates, and sample weights from the interactions; an example's own history tracks are left out
  of its negatives (:func:`history_score_mask`).
- The session term (:meth:`recsys_core.query_tower.QueryTower.with_session`): the scorer moves the
  query of a user who played something since the cutoff towards those plays; its weight is picked
  after the early stopping on a next-play validation (:func:`next_plays`), like the popularity prior.

The towers train on integer indices (ids are mapped to rows once, with polars, so no string lookups
run per batch); the exported SavedModels wrap them with ``StringLookup`` layers built from the same
vocabularies (row 0 is the out-of-vocabulary slot), so they take exactly the string keys that serving
sends. Training is seeded; early stopping watches recall@20 on a validation split carved out of the
training side the same temporal way as the holdout; the most recent interactions (the validation
part) are then learned by a short refit on the whole training side.

The training data are built one user bucket at a time (:mod:`recsys_assets.ml.buckets`): a train
side of one bucket keeps its examples in memory; with several, each bucket's examples go to an Arrow
IPC file and stream back a record batch at a time (:func:`_chunks`), so memory is that of a bucket.
"""

from __future__ import annotations

import itertools
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl

import recsys_assets  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from recsys_assets.ml.buckets import UserBuckets
from recsys_assets.ml.distribute import Placement
from recsys_assets.ml.metrics import EvalSet, build_eval_set, ranking_metrics, recommend
from recsys_core.query_tower import QueryTower

log = logging.getLogger(__name__)

OOV = "[OOV]"
REFIT_MODES = ("warm", "scratch", "none")
SESSION_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
MAX_QUERY_GENRES = 24


class TrainingError(ValueError):
    """The data cannot train a model; the message says why (raised before TensorFlow runs)."""


@dataclass(frozen=True)
class TwoTowerParams:
    """Hyperparameters (the Dagster ``TwoTowerConfig`` documents each one)."""

    embedding_dim: int = 64
    learning_rate: float = 0.05
    batch_size: int = 2048
    max_epochs: int = 30
    patience: int = 2
    temperature: float = 0.05
    l2: float = 0.0
    use_user_features: bool = True
    logq_correction: bool = True
    refit: str = "warm"
    refit_epochs: int = 1
    popularity_prior: bool = True
    validation_users: int = 2000
    min_train_pairs: int = 50
    # 20: the best validation recall@20 of 0, 20 and 50 under both protocols on ml-latest-small
    # (docs/benchmarks.md, "Model quality"); chosen on the validation split, never on the holdout.
    history_length: int = 20
    # How the history is pooled: the k-th most recent track weighs history_decay**k (1: the plain
    # mean). 0.9: the best mean validation recall@20 of 0.6…1.0 over three seeds, under both
    # protocols on ml-latest-small (docs/benchmarks.md); chosen on the validation split, never the holdout.
    history_decay: float = 0.9
    # The history's tracks as the candidate tower sees them (id + artist + genre embeddings), not by
    # their id embedding alone. Off: on the validation split (three seeds) it gains under the global
    # protocol (recall@20 0.0927 against 0.0863) and loses under the per-user one (0.1695 against
    # 0.1738) of ml-latest-small (docs/benchmarks.md).
    history_attributes: bool = False
    # Leave the in-batch candidates that are among an example's own history tracks out of its softmax.
    # A pair's track is never in its own history (the history is what came before its first play), so
    # scored as negatives they teach the tower to move away from what the user just played, and, through
    # the shared embeddings, from everything like it; the scorer filters heard tracks anyway. On the
    # simulated world of benchmarks/session_mood.py it lifts the history-aware model's simulated CTR@10
    # from 0.605 to 0.647 (static: 0.644); the quality table is with it (docs/benchmarks.md).
    mask_history_negatives: bool = True
    # An example's history includes the plays at its own instant that sort before it (by a hash of the
    # track, ml/history.py): with day-granular timestamps most plays share an instant, and "strictly
    # before" leaves their training histories empty while the served one (every play so far) is full.
    # Off by default (timestamps to the second); the per-training search chooses it (ml/tuning.py).
    history_ties: bool = False
    # The session term (recsys_core.query_tower.QueryTower.with_session): the last session_length plays
    # since the cutoff pull the query; its weight is picked at training from SESSION_WEIGHTS on a
    # next-play validation (0 where the last plays do not predict the next one).
    session_length: int = 5
    # The ranking stage (ml/ranker.py): a DCN trained on the validation split's candidates reorders the
    # top 100, kept in the version only when its gain on its own validation is above the noise.
    ranker: bool = True
    seed: int = 42


@dataclass(frozen=True)
class Vocabulary:
    """Ids in row order; row 0 of every embedding is the out-of-vocabulary slot."""

    users: np.ndarray
    items: np.ndarray
    artists: np.ndarray
    genres: np.ndarray
    query_genres: list[str]

    @classmethod
    def build(cls, pairs: pl.DataFrame, items: pl.DataFrame) -> Vocabulary:
        return cls.of(pairs["user_id"], items)

    @classmethod
    def of(cls, users: pl.Series, items: pl.DataFrame) -> Vocabulary:
        """The vocabulary of ``users`` (any order, repeats allowed) and the item table ``items``."""
        genres = items.group_by("genre").len().sort(["len", "genre"], descending=[True, False])["genre"].to_list()
        return cls(
            users=np.array([OOV, *users.unique().sort().to_list()], dtype=object),
            items=np.array([OOV, *items["track_id"].to_list()], dtype=object),
            artists=np.array([OOV, *items["artist_id"].unique().sort().to_list()], dtype=object),
            genres=np.array([OOV, *sorted(set(genres))], dtype=object),
            query_genres=genres[:MAX_QUERY_GENRES],
        )

    @staticmethod
    def index(ids: pl.Series, vocab: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` in ``vocab`` (0 for unknown ids)."""
        table = pl.DataFrame({"id": vocab[1:].astype(str), "row": np.arange(1, len(vocab), dtype=np.int64)})
        return (
            pl.DataFrame({"id": ids.cast(pl.String)})
            .join(table, on="id", how="left", maintain_order="left")["row"]
            .fill_null(0)
            .to_numpy()
        )


def item_table(interactions: pl.DataFrame, tracks: pl.DataFrame) -> pl.DataFrame:
    """One row per track of ``interactions``, sorted by id, with its artist and genre from ``tracks``.

    ``tracks`` is the ``track_features`` table (``track_id``, ``artist_id``, ``genre``); unknown
    attributes become ``∅``.
    """
    return (
        interactions.select("track_id")
        .unique()
        .join(tracks.select("track_id", "artist_id", "genre"), on="track_id", how="left")
        .with_columns(pl.col("artist_id").fill_null("∅"), pl.col("genre").fill_null("∅"))
        .sort("track_id")
    )


def with_genre(interactions: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """``interactions`` with each track's genre (for the query tower's genre shares)."""
    if "genre" in interactions.columns:
        return interactions
    return interactions.join(items.select("track_id", "genre"), on="track_id", how="left")


def query_feature_count(genres: list[str]) -> int:
    """The width of :func:`query_features`: a share per genre, "other", likes, activity."""
    return len(genres) + 3


def query_features(interactions: pl.DataFrame, users: np.ndarray, genres: list[str]) -> np.ndarray:
    """The query tower's dense features of ``users`` from their positives in ``interactions``.

    Genre shares of the user's positives over ``genres`` (plus one "other" share), log-activity and
    the share of likes. Computed from the training window only, so the evaluation never sees the
    holdout through the features. Unknown users get zeros.
    """
    stats = interactions.group_by("user_id").agg(
        pl.len().alias("n"),
        *[(pl.col("genre") == g).mean().alias(f"g{i}") for i, g in enumerate(genres)],
        pl.col("genre").is_in(genres).not_().mean().alias("g_other"),
        pl.col("liked").mean().alias("liked") if "liked" in interactions.columns else pl.lit(0.0).alias("liked"),
    )
    stats = stats.with_columns((pl.col("n").log1p() / 10.0).alias("activity")).drop("n")
    frame = pl.DataFrame({"user_id": pl.Series(users.astype(str))}).join(
        stats, on="user_id", how="left", maintain_order="left"
    )
    return frame.drop("user_id").fill_null(0.0).to_numpy().astype(np.float32)


# --- the towers ------------------------------------------------------------------------------------


def pooled_history(embedded, rows, decay: float = 1.0):
    """The recency-weighted mean of a history's item embeddings (``embedded``: batch × N × d, most
    recent first): the k-th known track weighs ``decay**k``; row 0 (padding and unknown tracks) is
    left out and not counted as a position; zeros for an empty history. ``decay`` 1 is the plain
    mean. The numpy twin, which serving runs, is :meth:`recsys_core.query_tower.QueryTower.embed_many`."""
    import tensorflow as tf

    weights = tf.cast(rows > 0, embedded.dtype)
    if decay != 1.0:
        position = tf.cumsum(weights, axis=1, exclusive=True)  # known tracks before this one
        weights = weights * tf.pow(tf.constant(decay, embedded.dtype), position)
    total = tf.maximum(tf.reduce_sum(weights, axis=1, keepdims=True), 1.0)
    return tf.reduce_sum(embedded * weights[..., None], axis=1) / total


def attribute_rows(items: pl.DataFrame, vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """Each item row's artist row and genre row (row 0, the out-of-vocabulary item: 0 and 0)."""
    artists = Vocabulary.index(items["artist_id"], vocab.artists)
    genres = Vocabulary.index(items["genre"], vocab.genres)
    return np.concatenate([[0], artists]), np.concatenate([[0], genres])


def _towers(vocab: Vocabulary, items: pl.DataFrame, n_features: int, params: TwoTowerParams):
    import tensorflow as tf

    reg = tf.keras.regularizers.l2(params.l2) if params.l2 else None
    dim = params.embedding_dim

    def init(offset: int):
        """Every initializer gets its own seed, so the same seed gives the same model in any process."""
        return tf.keras.initializers.RandomUniform(-0.05, 0.05, seed=params.seed * 101 + offset)

    # One vector per track, shared by the candidate tower and the query tower's history.
    item_embedding = tf.keras.layers.Embedding(
        len(vocab.items), dim, embeddings_initializer=init(3), embeddings_regularizer=reg
    )
    artist_embedding = tf.keras.layers.Embedding(
        len(vocab.artists), dim, embeddings_initializer=init(4), embeddings_regularizer=reg
    )
    genre_embedding = tf.keras.layers.Embedding(len(vocab.genres), dim, embeddings_initializer=init(5))
    artist_of, genre_of = (tf.constant(rows, dtype=tf.int32) for rows in attribute_rows(items, vocab))

    def track_vectors(rows):
        """The candidate tower's vector of each item row (id + artist + genre), before its projection."""
        rows = tf.cast(rows, tf.int32)
        return (
            item_embedding(rows)
            + artist_embedding(tf.gather(artist_of, rows))
            + genre_embedding(tf.gather(genre_of, rows))
        )

    class QueryTower(tf.keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.user_embedding = tf.keras.layers.Embedding(
                len(vocab.users), dim, embeddings_initializer=init(1), embeddings_regularizer=reg
            )
            self.use_features = params.use_user_features and n_features > 0
            self.features = (
                tf.keras.layers.Dense(
                    dim,
                    use_bias=False,
                    kernel_initializer=tf.keras.initializers.GlorotUniform(seed=params.seed * 101 + 2),
                )
                if self.use_features
                else None
            )

            self.use_history = params.history_length > 0
            if self.use_history:
                self.item_embedding = item_embedding  # the candidate tower's: one vector per track
                if params.history_attributes:
                    self.artist_embedding, self.genre_embedding = artist_embedding, genre_embedding
                self.history_projection = tf.keras.layers.Dense(
                    dim, use_bias=False,
                    kernel_initializer=tf.keras.initializers.GlorotUniform(seed=params.seed * 101 + 6),
                )  # fmt: skip

        def call(self, inputs):
            x = self.user_embedding(inputs["user_row"])
            if self.use_features:
                x = x + self.features(inputs["user_features"])
            if self.use_history:
                rows = inputs["history"]
                tracks = track_vectors(rows) if params.history_attributes else self.item_embedding(rows)
                x = x + self.history_projection(pooled_history(tracks, rows, params.history_decay))
            return x

    class CandidateTower(tf.keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.item_embedding = item_embedding
            self.artist_embedding = artist_embedding
            self.genre_embedding = genre_embedding

        def call(self, inputs):
            return (
                self.item_embedding(inputs["item_row"])
                + self.artist_embedding(inputs["artist_row"])
                + self.genre_embedding(inputs["genre_row"])
            )

    return QueryTower(), CandidateTower()


def history_score_mask(history, item_row, n_items: int):
    """batch × batch, for ``tfrs.tasks.Retrieval``'s ``score_mask``: False where the column's candidate
    is one of the row's history tracks (never on the diagonal, the row's own target).

    Written out because TFRS masks only candidates equal to the target (``remove_accidental_hits``).
    O(batch × N): each item's in-batch position by a scatter, the history looked up in it, then the hits
    copied to every column holding the same item (a batch can hold an item twice).
    """
    import tensorflow as tf

    item_row = tf.cast(item_row, tf.int32)
    history = tf.cast(history, tf.int32)
    b, n = tf.shape(item_row)[0], tf.shape(history)[1]
    position = tf.tensor_scatter_nd_update(tf.fill([n_items], -1), item_row[:, None], tf.range(b))
    in_batch = tf.gather(position, history)  # b × n: a column holding the history track, or -1
    found = (in_batch >= 0) & (history > 0)
    rows = tf.broadcast_to(tf.range(b)[:, None], [b, n])
    index = tf.boolean_mask(tf.stack([rows, in_batch], axis=-1), found)
    hit = tf.scatter_nd(index, tf.ones(tf.shape(index)[:1], tf.int32), [b, b]) > 0
    hit = tf.gather(hit, tf.gather(position, item_row), axis=1)  # every column of the same item
    return ~hit | tf.eye(b, dtype=tf.bool)


def _build_model(vocab: Vocabulary, items: pl.DataFrame, n_features: int, params: TwoTowerParams, strategy=None):
    import tensorflow as tf
    import tensorflow_recommenders as tfrs

    query, candidate = _towers(vocab, items, n_features, params)

    class TwoTower(tfrs.Model):
        def __init__(self) -> None:
            super().__init__()
            self.query_tower = query
            self.candidate_tower = candidate
            self.task = tfrs.tasks.Retrieval(temperature=params.temperature, remove_accidental_hits=True)

        def compute_loss(self, features, training=False):
            q = self.query_tower(features)
            c = self.candidate_tower(features)
            return self.task(
                q,
                c,
                sample_weight=features["weight"],
                candidate_sampling_probability=features["sampling_probability"] if params.logq_correction else None,
                candidate_ids=features["item_row"],
                compute_metrics=not training,
                score_mask=history_score_mask(features["history"], features["item_row"], len(vocab.items))
                if params.history_length and params.mask_history_negatives
                else None,
            )

        def train_step(self, inputs):
            """``tfrs.Model.train_step`` with the regularization loss divided by the replicas in sync: the
            gradients of the replicas are summed, and each replica adds the whole penalty."""
            with tf.GradientTape() as tape:
                loss = self.compute_loss(inputs, training=True)
                regularization = tf.nn.scale_regularization_loss(tf.add_n(self.losses)) if self.losses else 0.0
                total = loss + regularization
            gradients = tape.gradient(total, self.trainable_variables)
            self.optimizer.apply_gradients(zip(gradients, self.trainable_variables, strict=True))
            return {"loss": loss, "regularization_loss": regularization, "total_loss": total}

    with (strategy or tf.distribute.get_strategy()).scope():
        model = TwoTower()
        model.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate=params.learning_rate))
    return model


# --- training --------------------------------------------------------------------------------------


def training_pairs(interactions: pl.DataFrame) -> pl.DataFrame:
    """The distinct (user, track) pairs with weight log(1 + Σ weights) and the time of their first
    play (``first_at``: the moment a pair's example is predicted, for its history), in a fixed order
    (the shuffle is seeded, so the input order must not depend on hashing)."""
    return (
        interactions.group_by("user_id", "track_id")
        .agg(pl.col("weight").sum().log1p().alias("weight"), pl.col("played_at").min().alias("first_at"))
        .sort("user_id", "track_id")
    )


def _track_index(vocab: Vocabulary) -> pl.DataFrame:
    return pl.DataFrame(
        {"track_id": vocab.items[1:].astype(str), "row": np.arange(1, len(vocab.items), dtype=np.int32)}
    )


def _padded(lists: pl.Series, n: int) -> np.ndarray:
    """Lists of at most ``n`` rows → an (len × n) int32 matrix, 0-padded on the right."""
    padded = pl.concat_list(lists, pl.lit(0, pl.Int32).repeat_by(n - lists.list.len()))
    return pl.select(padded.list.to_array(n)).to_series().to_numpy().astype(np.int32).reshape(len(lists), n)


def example_histories(pairs: pl.DataFrame, vocab: Vocabulary, n: int, ties: bool = False) -> np.ndarray:
    """For each row of ``pairs`` (in its order), the user's last ``n`` distinct positive tracks whose
    first play is strictly before the pair's own (most recent first, 0-padded): only the past. With
    ``ties``, also those first played at the same instant that sort before it (by a hash of the track)."""
    from recsys_assets.ml.history import history_matrix

    frame = pairs.select("user_id", "track_id", pl.col("first_at").alias("played_at")).with_row_index("_i")
    ordered, matrix, _ = history_matrix(frame, _track_index(vocab), n, ties=ties)
    out = np.empty_like(matrix)
    out[ordered["_i"].to_numpy()] = matrix
    return out


def latest_histories(pairs: pl.DataFrame, vocab: Vocabulary, n: int, ties: bool = False) -> np.ndarray:
    """Each user's last ``n`` distinct positive tracks (by first play; most recent first, 0-padded),
    in the rows of ``vocab.users``: the user's history at the end of ``pairs`` (row 0: empty). With
    ``ties``, the plays of one instant in the order the training's histories gave them."""
    from recsys_assets.ml.history import TIE_SEED

    last = (
        pairs.join(_track_index(vocab), on="track_id", how="left")
        .with_columns(pl.col("row").fill_null(0))
        .sort("user_id", "first_at", pl.col("track_id").hash(TIE_SEED) if ties else pl.col("track_id"))
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("row").tail(n).reverse())
    )
    out = np.zeros((len(vocab.users), n), dtype=np.int32)
    out[Vocabulary.index(last["user_id"], vocab.users)] = _padded(last["row"], n)
    out[0] = 0
    return out


@dataclass
class TrainedTwoTower:
    """A trained model: its vocabulary, embeddings and Keras towers (for the SavedModel export)."""

    params: TwoTowerParams
    vocab: Vocabulary
    item_frame: pl.DataFrame  # track_id, artist_id, genre (rows 1.. of the item vocabulary)
    user_features: np.ndarray  # rows of vocab.users (row 0: zeros)
    user_embeddings: np.ndarray
    item_embeddings: np.ndarray
    model: object = field(repr=False)
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    popularity_prior: float = 0.0
    prior_scores: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    examples_per_second: float = 0.0
    pairs: int = 0
    user_history: np.ndarray | None = None  # rows of vocab.users × history_length, at the training cutoff
    session_weight: float = 0.0
    session_scores: list[dict] = field(default_factory=list)
    # The user and item embeddings (prior included) before the refit: the model the validation split
    # scored, from which the ranking stage learns (``ml/ranker.py``). ``None`` without a validation split.
    fit_embeddings: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def query_tower(self) -> QueryTower:
        """The history-aware query tower's weights for the numpy twin (``recsys_core.query_tower``)."""
        return numpy_query_tower(self.model, self.params, self.item_frame, self.vocab, self.session_weight)


def _examples(pairs: pl.DataFrame, vocab: Vocabulary, params: TwoTowerParams) -> dict[str, np.ndarray]:
    """The training examples of ``pairs`` (one per distinct pair): what differs from pair to pair. What
    a row of the user or item tables gives (the user's features, the track's artist, genre and logQ
    probability) is gathered per batch by :func:`_dataset`, not stored per example."""
    n = params.history_length
    history = {"history": example_histories(pairs, vocab, n, ties=params.history_ties)} if n else {}
    return {
        **history,
        "user_row": Vocabulary.index(pairs["user_id"], vocab.users),
        "item_row": Vocabulary.index(pairs["track_id"], vocab.items),
        "weight": pairs["weight"].to_numpy().astype(np.float32),
    }


CHUNK_ROWS = 256  # the examples of one record batch of a saved bucket: the unit of the streamed shuffle


@dataclass
class _Examples:
    """One training phase's examples: in memory (a table of one bucket), or one Arrow IPC file per bucket
    on disk, each in its own shuffled order, read back a record batch at a time (:func:`_chunks`)."""

    arrays: dict[str, np.ndarray] | None = None
    files: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(self.sizes)

    def add(self, arrays: dict[str, np.ndarray], path: Path | None, seed: int) -> None:
        n = len(arrays["item_row"])
        if not n:
            return
        self.sizes.append(n)
        if path is None:
            self.arrays = arrays
            return
        # Arrow IPC, not tf.data's Dataset.save: each save kept the bucket's arrays in the process
        # (measured: +150 MB a bucket of 1.5 M examples, never given back).
        import pyarrow as pa

        order = np.random.default_rng(seed).permutation(n)
        columns = {name: values[order] for name, values in arrays.items()}
        table = pa.table({name: _arrow(values) for name, values in columns.items()})
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=CHUNK_ROWS)
        self.files.append(str(path))


def _arrow(values: np.ndarray):
    import pyarrow as pa

    if values.ndim == 1:
        return pa.array(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _chunks(files: list[str], seed: int, shard: int = 0, shards: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every record batch of ``files`` in a random order (the same for the same ``seed``), as numpy
    columns; the ``shard``-th of every ``shards`` of that order only. Read from the files a batch at a
    time (not memory-mapped: mapped pages would count as the process's memory).

    Written here because tf.data reads no Arrow: tensorflow-io's Arrow datasets stopped at 0.37.1
    (2024, TensorFlow 2.16) and this stack pins 2.21; pyarrow's reader does the reading."""
    import pyarrow as pa

    sources = [pa.OSFile(path, "rb") for path in files]
    try:
        readers = [pa.ipc.open_file(source) for source in sources]
        index = np.array([(f, b) for f, r in enumerate(readers) for b in range(r.num_record_batches)], dtype=np.int64)
        for f, b in index[np.random.default_rng(seed).permutation(len(index))][shard::shards]:
            batch = readers[f].get_batch(int(b))
            out = {}
            for name, column in zip(batch.schema.names, batch.columns, strict=True):
                if pa.types.is_fixed_size_list(column.type):
                    out[name] = column.values.to_numpy().reshape(len(column), column.type.list_size)
                else:
                    out[name] = column.to_numpy()
            yield out
    finally:  # also when the reading stops early (the signature's first batch, an epoch cut short)
        for source in sources:
            source.close()


@dataclass(frozen=True)
class _Tables:
    """The per-row tables that complete a batch of examples (:func:`_dataset`)."""

    user_features: np.ndarray  # rows of vocab.users
    sampling_probability: np.ndarray  # rows of vocab.items: the phase's share of pairs (logQ)
    artist_of: np.ndarray
    genre_of: np.ndarray


def numpy_query_tower(model, params: TwoTowerParams, items: pl.DataFrame, vocab: Vocabulary,
                      session_weight: float = 0.0) -> QueryTower:  # fmt: skip
    """``model``'s query tower as :class:`recsys_core.query_tower.QueryTower` (numpy, what serving runs)."""
    core = model.query_tower
    if not core.use_history:  # a tower of id and features: an empty history contributes nothing
        dim = core.user_embedding.embeddings.shape[1]
        return QueryTower(
            user_embedding=core.user_embedding.embeddings.numpy(),
            history_items=np.zeros((len(vocab.items), dim), dtype=np.float32),
            history_kernel=np.zeros((dim, dim), dtype=np.float32),
            features_kernel=core.features.kernel.numpy() if core.use_features else None,
        )
    history_items = core.item_embedding.embeddings.numpy()
    if params.history_attributes:  # the candidate tower's whole track vector: id + artist + genre
        artist_of, genre_of = attribute_rows(items, vocab)
        artists, genres = core.artist_embedding.embeddings.numpy(), core.genre_embedding.embeddings.numpy()
        history_items = history_items + artists[artist_of] + genres[genre_of]
    return QueryTower(
        user_embedding=core.user_embedding.embeddings.numpy(),
        history_items=history_items,
        history_kernel=core.history_projection.kernel.numpy(),
        features_kernel=core.features.kernel.numpy() if core.use_features else None,
        history_decay=float(params.history_decay),
        session_weight=float(session_weight),
        session_length=params.session_length if session_weight else 0,
    )


def next_plays(fit_pairs: pl.DataFrame, val_part: pl.DataFrame, users: np.ndarray) -> pl.DataFrame:
    """The next-play validation of the session term: for each of ``users`` with a track new to them
    (not in ``fit_pairs``) in ``val_part`` after at least one other track there, ``target`` (the last
    such track) and ``recent`` (the distinct tracks they played in ``val_part`` before it, most recent
    first): what the service would have heard from them since the cutoff, and what they played next."""
    heard = training_pairs(val_part.filter(pl.col("user_id").is_in(users.astype(str).tolist())))
    new = heard.join(fit_pairs.select("user_id", "track_id").unique(), on=["user_id", "track_id"], how="anti")
    targets = new.sort("user_id", "first_at", "track_id").group_by("user_id", maintain_order=True).last()
    return (
        heard.join(targets.select("user_id", pl.col("first_at").alias("target_at")), on="user_id")
        .filter(pl.col("first_at") < pl.col("target_at"))
        .sort("user_id", "first_at", "track_id", descending=[False, True, True])
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("track_id").alias("recent"))
        .join(targets.select("user_id", pl.col("track_id").alias("target")), on="user_id")
    )


def _pick_session(
    model, vocab, items, state, fit_pairs, val_part, validation: EvalSet, params, prior: float, log_q: np.ndarray
) -> tuple[float, list[dict]]:
    """The session term's weight (``SESSION_WEIGHTS``) with the best next-play NDCG@20 on the validation
    split: each user's query as the scorer builds it after their earlier validation plays, the target
    ranked among the tracks they had not heard (their training tracks and those plays left out).
    ``fit_pairs`` and ``val_part``: at least the validation users'; ``log_q``: of every fit pair."""
    from recsys_core.query_tower import merged_history, unit_directions

    cases = next_plays(fit_pairs, val_part, validation.users)
    # One lookup for every user's plays, not one per user; an empty list explodes to one null (row 0).
    lengths = np.maximum(cases["recent"].list.len().to_numpy(), 1)
    flat = Vocabulary.index(cases["recent"].explode(), vocab.items)
    played = np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []
    targets = Vocabulary.index(cases["target"], vocab.items)
    keep = np.array([bool((p > 0).any()) for p in played], dtype=bool) & (targets > 0)
    if not keep.any():
        return 0.0, []
    users = Vocabulary.index(cases["user_id"], vocab.users)[keep]
    targets = targets[keep]
    played = [p[p > 0] for p, k in zip(played, keep, strict=True) if k]
    user_emb, item_emb = _embeddings(model, vocab, items, state, params)
    _, candidates = with_prior(user_emb, item_emb, params.temperature * prior, log_q)
    directions = unit_directions(candidates)
    tower = numpy_query_tower(model, params, items, vocab)
    n = params.history_length
    histories = np.zeros((len(users), n), dtype=np.int64)
    for i, (p, u) in enumerate(zip(played, users, strict=True)):
        merged = merged_history(p, state["history"][u], n)
        histories[i, : len(merged)] = merged
    features = state["user_features"][users] if tower.features_kernel is not None else None
    queries = tower.embed_many(users, features, histories)
    seen = _seen_rows(fit_pairs, vocab)
    scores = []
    for weight in SESSION_WEIGHTS:
        moved = replace(tower, session_weight=weight, session_length=params.session_length)
        q = np.stack([moved.with_session(query, p, directions) for query, p in zip(queries, played, strict=True)])
        gains = []
        for start in range(0, len(users), 256):
            part = slice(start, start + 256)
            s = q[part] @ candidates.T
            s[:, 0] = -np.inf
            for i, (u, p) in enumerate(zip(users[part], played[part], strict=True)):
                s[i, seen.get(int(u), _NO_ROWS)] = -np.inf
                s[i, p] = -np.inf
            target = s[np.arange(len(s)), targets[part]]
            rank = (s > target[:, None]).sum(axis=1)
            gains.append(np.where(rank < 20, 1.0 / np.log2(rank + 2.0), 0.0))
        scores.append({"session_weight": weight, "val_next_ndcg@20": float(np.concatenate(gains).mean())})
    best = max(scores, key=lambda s: s["val_next_ndcg@20"])
    log.info("session term on the next-play validation (%d users): %s", len(users), scores)
    return best["session_weight"], [{**s, "users": len(users)} for s in scores]


_NO_ROWS = np.empty(0, dtype=np.int64)


def _seen_rows(pairs: pl.DataFrame, vocab: Vocabulary) -> dict[int, np.ndarray]:
    """Each user row's item rows in ``pairs``."""
    users = Vocabulary.index(pairs["user_id"], vocab.users)
    rows = Vocabulary.index(pairs["track_id"], vocab.items)
    order = np.argsort(users, kind="stable")
    starts = np.flatnonzero(np.r_[True, users[order][1:] != users[order][:-1]])
    return {int(u): r for u, r in zip(users[order][starts], np.split(rows[order], starts[1:]), strict=True)}


def _embeddings(
    model, vocab: Vocabulary, items: pl.DataFrame, state: dict[str, np.ndarray], params: TwoTowerParams
) -> tuple[np.ndarray, np.ndarray]:
    """Every item's and every user's embedding; ``state``: the query tower's per-user inputs, in the
    rows of ``vocab.users`` (``user_features``, and ``history`` at the moment the users are scored).

    Computed in numpy from the towers' weights (the arithmetic serving runs, ``recsys_core.query_tower``),
    not with ``Model.predict``: under a multi-worker strategy ``predict`` is itself distributed, and
    every worker must reach the same early-stopping decision from the same synchronised weights."""
    candidate = model.candidate_tower
    artists, genres = attribute_rows(items, vocab)
    item_emb = (
        candidate.item_embedding.embeddings.numpy()
        + candidate.artist_embedding.embeddings.numpy()[artists]
        + candidate.genre_embedding.embeddings.numpy()[genres]
    )
    tower = numpy_query_tower(model, params, items, vocab)
    histories = state.get("history", np.zeros((len(vocab.users), 0), dtype=np.int32))
    user_emb = tower.embed_all(state["user_features"], histories)[:, :-1]  # without the prior's 1
    return np.ascontiguousarray(user_emb, dtype=np.float32), np.asarray(item_emb, dtype=np.float32)


def _dataset(
    examples: _Examples, tables: _Tables, params: TwoTowerParams, epoch_seed: int, placement: Placement | None = None
):
    """The training examples, shuffled each epoch and batched ``batch_size`` per replica; and the steps
    of an epoch (``None``: until the data ends, on one replica).

    In memory, the examples' row numbers are shuffled and batched, then each batch gathered at once.
    From disk, the buckets' record batches of ``CHUNK_ROWS`` examples (each bucket was saved in its own
    shuffled order) are read in a new random order each epoch and re-batched: a bounded shuffle whose
    memory is a few record batches. Either way a batch is completed from the per-row tables (the user's
    features, the track's attributes and logQ probability).

    Under a strategy with more than one input pipeline (one per worker), each worker takes its own
    ``1/workers`` of the examples, so all take the same number of steps (a worker with one step more
    would wait forever on the others' gradients); the dataset repeats, and the epoch is that many steps
    (Keras needs the count for a distributed dataset)."""
    import tensorflow as tf

    n = examples.rows
    replicas = placement.replicas if placement is not None else 1
    pipelines = placement.workers if placement is not None and placement.name == "multi-worker" else 1
    local_replicas = max(replicas // pipelines, 1)  # replicas fed by one pipeline: each needs a batch per step
    per_pipeline = n // pipelines
    if local_replicas > 1:
        steps = per_pipeline // params.batch_size // local_replicas
    else:
        steps = -(-per_pipeline // params.batch_size)
    if replicas > 1 and steps < 1:
        raise TrainingError(
            f"{n} training pairs cannot give each of {replicas} replicas a batch of {params.batch_size}"
        )

    def build(context: tf.distribute.InputContext | None = None):
        shards = context.num_input_pipelines if context is not None else 1
        if examples.arrays is not None:
            # Shuffling the examples themselves (nine tensors each) took a quarter of an epoch's time on
            # 2 cores (docs/benchmarks.md, "Training time"): their row numbers are shuffled instead.
            tensors = {name: tf.constant(values) for name, values in examples.arrays.items()}
            rows = tf.data.Dataset.range(n)
            if shards > 1:
                rows = rows.take(per_pipeline * shards).shard(shards, context.input_pipeline_id)
            rows = rows.shuffle(min(per_pipeline, 1_000_000), seed=epoch_seed, reshuffle_each_iteration=True)
            rows = rows.batch(params.batch_size, drop_remainder=local_replicas > 1)
            batches = rows.map(lambda batch: {name: tf.gather(t, batch) for name, t in tensors.items()})
        else:
            # A new order of the buckets' record batches each epoch (the generator runs again at each
            # pass over the dataset), then re-batched: memory is a few record batches.
            epochs = itertools.count(epoch_seed)
            shard = context.input_pipeline_id if shards > 1 else 0
            first = next(_chunks(examples.files[:1], 0))
            signature = {name: tf.TensorSpec((None, *v.shape[1:]), tf.as_dtype(v.dtype)) for name, v in first.items()}
            chunks = tf.data.Dataset.from_generator(
                lambda: _chunks(examples.files, next(epochs), shard, shards), output_signature=signature
            )
            batches = chunks.rebatch(params.batch_size, drop_remainder=local_replicas > 1)
        features, probability = tf.constant(tables.user_features), tf.constant(tables.sampling_probability)
        artist_of, genre_of = tf.constant(tables.artist_of), tf.constant(tables.genre_of)

        def complete(batch):
            items = batch["item_row"]
            return {
                **batch,
                "user_features": tf.gather(features, batch["user_row"]),
                "artist_row": tf.gather(artist_of, items),
                "genre_row": tf.gather(genre_of, items),
                "sampling_probability": tf.gather(probability, items),
            }

        ds = batches.map(complete, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return (ds.repeat() if context is not None else ds).prefetch(tf.data.AUTOTUNE)

    if replicas == 1:
        return build(), None
    return placement.strategy.distribute_datasets_from_function(build), steps


PRIOR_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def log_popularity(pairs: pl.DataFrame, vocab: Vocabulary) -> np.ndarray:
    """log q(item): the smoothed share of training pairs per item row (the logQ of the loss)."""
    return _log_q(_item_counts(pairs, vocab))


def _item_counts(pairs: pl.DataFrame, vocab: Vocabulary) -> np.ndarray:
    return np.bincount(Vocabulary.index(pairs["track_id"], vocab.items), minlength=len(vocab.items)).astype(np.float64)


def _log_q(counts: np.ndarray) -> np.ndarray:
    """log q(item) from the pairs per item row (row 0 left out)."""
    counts = counts.astype(np.float64)
    counts[0] = 0.0
    return np.log((counts + 1.0) / (counts.sum() + len(counts))).astype(np.float32)


def with_prior(
    user_emb: np.ndarray, item_emb: np.ndarray, weight: float, log_q: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings whose dot product is ``u·v + weight·log q(v)``: one more dimension on each side.

    The logQ correction trains scores with the popularity of in-batch negatives taken out; adding
    ``temperature × α × log q`` back at scoring time (α picked on the validation split) lets the
    recommendations lean towards popular tracks as much as the held-out data rewards it.
    """
    ones = np.ones((len(user_emb), 1), dtype=np.float32)
    return (
        np.hstack([user_emb, ones]).astype(np.float32),
        np.hstack([item_emb, (weight * log_q)[:, None]]).astype(np.float32),
    )


def _pick_prior(model, vocab, items, state, validation: EvalSet, log_q: np.ndarray, params) -> tuple[float, list[dict]]:
    """The α of :func:`with_prior` with the best validation NDCG@10 (``log_q``: of the fit pairs)."""
    user_emb, item_emb = _embeddings(model, vocab, items, state, params)
    scores = []
    for alpha in PRIOR_GRID:
        u, v = with_prior(user_emb, item_emb, params.temperature * alpha, log_q)
        metrics = ranking_metrics(
            recommend(_validation_scorer(vocab, u, v, validation.items), validation, 10, top=_top_k),
            validation,
            ks=(10,),
        )
        scores.append({"popularity_prior": alpha, "val_ndcg@10": metrics.metrics["ndcg@10"]})
    best = max(scores, key=lambda s: s["val_ndcg@10"])
    return best["popularity_prior"], scores


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """:func:`recsys_assets.ml.metrics.top_k` by TensorFlow, for the validations during training:
    TensorFlow's threads are up anyway, and numpy's partition ran at half speed against them (0.7 s
    against 0.35 s alone for 2,000 users × 60,000 tracks; TensorFlow's 0.21 s). The same indices on
    continuous scores; among equal scores at the cut TensorFlow keeps the lower indices, where numpy's
    partition keeps any."""
    import tensorflow as tf

    return tf.math.top_k(scores, k=min(k, scores.shape[1])).indices.numpy().astype(np.int64)


def _validation_scorer(vocab: Vocabulary, user_emb: np.ndarray, item_emb: np.ndarray, eval_items: np.ndarray):
    item_rows = Vocabulary.index(pl.Series(eval_items), vocab.items)
    candidates = item_emb[item_rows]

    def score(users: np.ndarray) -> np.ndarray:
        rows = Vocabulary.index(pl.Series(users), vocab.users)
        scores = user_emb[rows] @ candidates.T
        scores[:, item_rows == 0] = -np.inf
        return scores

    return score


class _EpochEnd:
    """Per-epoch bookkeeping: timing, validation recall@20, early stopping on it, best weights."""

    def __init__(self, model, vocab, items, state, validation, params, progress, phase):
        self.model, self.vocab, self.items, self.state = model, vocab, items, state
        self.validation, self.params, self.progress, self.phase = validation, params, progress, phase
        self.history: list[dict] = []
        self.best_epoch, self.best_score, self.best_weights, self.waited = 0, -math.inf, None, 0
        self.seconds = 0.0
        self._t0 = 0.0

    def callback(self):
        import tensorflow as tf

        outer = self

        class Callback(tf.keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                outer._t0 = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                if outer.end(epoch + 1, float((logs or {}).get("loss", math.nan))):
                    self.model.stop_training = True

        return Callback()

    def end(self, epoch: int, loss: float) -> bool:
        """Record the epoch; return whether to stop."""
        seconds = time.perf_counter() - self._t0
        self.seconds += seconds
        record = {"epoch": epoch, "loss": loss, "seconds": seconds}
        if self.phase:
            record["phase"] = self.phase
        stop = False
        if self.validation is not None:
            user_emb, item_emb = _embeddings(self.model, self.vocab, self.items, self.state, self.params)
            scorer = _validation_scorer(self.vocab, user_emb, item_emb, self.validation.items)
            recs = recommend(scorer, self.validation, 20, top=_top_k)
            metrics = ranking_metrics(recs, self.validation, ks=(20,)).metrics
            record["val_recall@20"] = metrics["recall@20"]
            record["val_ndcg@20"] = metrics["ndcg@20"]
            if metrics["recall@20"] > self.best_score + 1e-6:
                self.best_epoch, self.best_score, self.waited = epoch, metrics["recall@20"], 0
                self.best_weights = self.model.get_weights()
            else:
                self.waited += 1
                stop = self.waited >= self.params.patience
        self.history.append(record)
        log.info("epoch %s", record)
        if self.progress is not None:
            self.progress(record)
        return stop


@dataclass
class _Phase:
    """What one fit trains on: its examples, the query tower's per-user inputs at the end of its pairs
    (``user_features`` and ``history``, rows of ``vocab.users``) and its pairs per item row."""

    examples: _Examples
    state: dict[str, np.ndarray]
    counts: np.ndarray

    def tables(self, vocab: Vocabulary, items: pl.DataFrame) -> _Tables:
        artist_of, genre_of = attribute_rows(items, vocab)
        probability = self.counts / max(self.counts.sum(), 1.0)
        return _Tables(self.state["user_features"], probability.astype(np.float32), artist_of, genre_of)


def _fit(
    model,
    phase_data: _Phase,
    items: pl.DataFrame,
    vocab: Vocabulary,
    params: TwoTowerParams,
    epochs: int,
    validation: EvalSet | None,
    progress: Callable[[dict], None] | None,
    phase: str = "",
    placement: Placement | None = None,
) -> _EpochEnd:
    """Train ``model`` for up to ``epochs`` epochs in one ``fit`` call; restore the best weights."""
    tracker = _EpochEnd(model, vocab, items, phase_data.state, validation, params, progress, phase)
    dataset, steps = _dataset(phase_data.examples, phase_data.tables(vocab, items), params, params.seed, placement)
    model.fit(dataset, epochs=epochs, steps_per_epoch=steps, verbose=0, callbacks=[tracker.callback()])
    if validation is not None and tracker.best_weights is not None:
        model.set_weights(tracker.best_weights)
    else:
        tracker.best_epoch = len(tracker.history)
    tracker.examples = phase_data.examples.rows * len(tracker.history)
    return tracker


# (window, fit part, validation part) of one user bucket; the last two are None without a validation split
Part = tuple[pl.DataFrame, pl.DataFrame | None, pl.DataFrame | None]


def _parts(
    train: pl.DataFrame | UserBuckets,
    validation_split: tuple[pl.DataFrame, pl.DataFrame] | str | None,
    scratch: Path | None = None,
) -> Callable[[], Iterable[Part]]:
    """The training's input, one user bucket at a time, as often as it is asked for: a single bucket is
    split once and kept in memory; with several, the first reading splits each bucket and saves its
    parts under ``scratch``, and the later ones read them back."""
    from recsys_assets.ml.split import bucket_splits

    if isinstance(validation_split, tuple):  # given whole: the train side is one bucket
        frame = train.collect() if isinstance(train, UserBuckets) else train
        return lambda: [(frame, *validation_split)]
    buckets = train if isinstance(train, UserBuckets) else UserBuckets((train,))

    def read() -> Iterator[Part]:
        if validation_split is None:
            return ((bucket, None, None) for bucket in buckets)
        splits = bucket_splits(buckets, validation_split)
        return ((bucket, split.train, split.holdout) for bucket, split in zip(buckets, splits, strict=True))

    if len(buckets) == 1:
        cached = list(read())
        return lambda: cached
    if scratch is None or validation_split is None:
        return read
    saved: list[tuple[Path, Path]] = []

    def read_saved() -> Iterator[Part]:
        if saved:
            for bucket, (fit, val) in zip(buckets, saved, strict=True):
                yield bucket, pl.read_parquet(fit), pl.read_parquet(val)
            return
        for b, (bucket, fit, val) in enumerate(read()):
            paths = (scratch / f"split-{b}-fit.parquet", scratch / f"split-{b}-validation.parquet")
            fit.write_parquet(paths[0])
            val.write_parquet(paths[1])
            saved.append(paths)
            yield bucket, fit, val

    return read_saved


@dataclass
class _Prepared:
    """The training data, built one user bucket at a time (:func:`_prepare`)."""

    vocab: Vocabulary
    items: pl.DataFrame
    pairs: int
    full: _Phase
    fit: _Phase | None = None
    validation: EvalSet | None = None
    fit_sample: pl.DataFrame | None = None  # the validation users' fit part and validation part
    val_sample: pl.DataFrame | None = None


def _user_state(interactions: pl.DataFrame, pairs: pl.DataFrame, vocab: Vocabulary, items: pl.DataFrame,
                params: TwoTowerParams, state: dict[str, np.ndarray]) -> None:  # fmt: skip
    """Fill ``state``'s rows of the users of ``pairs`` (one bucket's) from their interactions."""
    users = pairs["user_id"].unique().sort()
    rows = Vocabulary.index(users, vocab.users)
    state["user_features"][rows] = query_features(
        with_genre(interactions, items), users.to_numpy().astype(str), vocab.query_genres
    )
    if params.history_length:
        state["history"][rows] = latest_histories(pairs, vocab, params.history_length, params.history_ties)[rows]


def _prepare(parts: Callable[[], Iterable[Part]], tracks: pl.DataFrame, params: TwoTowerParams,
             scratch: Path | None) -> _Prepared:  # fmt: skip
    """Two passes over the buckets. The first gathers what spans users: the vocabulary (users and tracks
    of the pairs), the fit part's tracks (the validation ranks among them) and the users that the
    validation can evaluate, of whom ``validation_users`` are drawn. The second builds each bucket's
    examples (saved under ``scratch`` when there is more than one bucket), its users' features and
    latest histories, and the item counts of the logQ correction; and keeps the validation users' rows.

    Raises:
        TrainingError: too few pairs, users or tracks to train anything meaningful.
    """
    from recsys_assets.ml.metrics import eval_users

    n_pairs, users, tracks_of, fit_tracks, eligible = 0, [], [], [], []
    for window, fit, val in parts():
        pairs = training_pairs(window)
        n_pairs += pairs.height
        users.append(pairs["user_id"].unique())
        tracks_of.append(pairs["track_id"].unique())
        if fit is not None:
            fit_tracks.append(fit["track_id"].unique())
            eligible.append(eval_users(fit, val))
    if n_pairs < params.min_train_pairs:
        raise TrainingError(
            f"{n_pairs} distinct (user, track) training pairs: at least {params.min_train_pairs} are needed "
            "(min_train_pairs)"
        )
    all_users, all_tracks = pl.concat(users).unique(), pl.concat(tracks_of).unique()
    if len(all_users) < 2 or len(all_tracks) < 2:
        raise TrainingError(
            f"{len(all_users)} users and {len(all_tracks)} tracks: a retrieval model needs at least two of each"
        )
    items = item_table(pl.DataFrame({"track_id": all_tracks}), tracks)
    vocab = Vocabulary.of(all_users, items)
    validating = bool(fit_tracks)
    chosen = pl.concat(eligible).sort() if validating else pl.Series("user_id", [], pl.String)
    if len(chosen) > params.validation_users:
        keep = np.random.default_rng(params.seed).choice(len(chosen), params.validation_users, replace=False)
        chosen = chosen.gather(np.sort(keep))

    def empty_phase() -> _Phase:
        width = query_feature_count(vocab.query_genres)
        state = {"user_features": np.zeros((len(vocab.users), width), dtype=np.float32)}
        if params.history_length:
            state["history"] = np.zeros((len(vocab.users), params.history_length), dtype=np.int32)
        return _Phase(_Examples(), state, np.zeros(len(vocab.items), dtype=np.float64))

    full, fit_phase = empty_phase(), empty_phase() if validating else None
    fit_sample, val_sample = [], []
    for b, (window, fit, val) in enumerate(parts()):
        for phase, interactions, name in ((full, window, "full"), (fit_phase, fit, "fit")):
            if phase is None:
                continue
            pairs = training_pairs(interactions)
            _user_state(interactions, pairs, vocab, items, params, phase.state)
            phase.counts += _item_counts(pairs, vocab)
            path = None if scratch is None else scratch / f"examples-{name}-{b}.arrow"
            phase.examples.add(_examples(pairs, vocab, params), path, params.seed + b)
        if validating:
            fit_sample.append(fit.join(chosen.to_frame("user_id"), on="user_id", how="semi"))
            val_sample.append(val.join(chosen.to_frame("user_id"), on="user_id", how="semi"))
    prepared = _Prepared(vocab, items, n_pairs, full, fit_phase)
    if validating:
        prepared.fit_sample, prepared.val_sample = pl.concat(fit_sample), pl.concat(val_sample)
        ranked = pl.concat(fit_tracks).unique().sort()
        prepared.validation = build_eval_set(prepared.fit_sample, prepared.val_sample, items=ranked)
    return prepared


def train_two_tower(
    train: pl.DataFrame | UserBuckets,
    tracks: pl.DataFrame,
    validation_split: tuple[pl.DataFrame, pl.DataFrame] | str | None,
    params: TwoTowerParams,
    progress: Callable[[dict], None] | None = None,
    placement: Placement | None = None,
    scratch: Path | None = None,
) -> TrainedTwoTower:
    """Train on the train side's positive interactions.

    With a validation split, the model trains on its fit part, stops early on the validation
    recall@20 and keeps its best weights; then (``refit``) it either trains ``refit_epochs`` more
    epochs on the whole train side (``warm``, the default: the most recent interactions are learned
    too, at a small cost), is retrained from scratch on it for the best number of epochs
    (``scratch``), or is kept as it is (``none``).

    Args:
        train: positives of the train side (``user_id``, ``track_id``, ``played_at``, ``weight``,
            ``liked``): a table, or the table cut into user buckets (:mod:`recsys_assets.ml.buckets`),
            which are read one at a time and whose examples stream from disk: the training's memory is
            then that of a bucket, whatever the number of events.
        tracks: track attributes (``track_id``, ``artist_id``, ``genre``: the ``track_features`` table).
        validation_split: a protocol (``global`` or ``user``: the validation split is carved out of
            ``train`` as :func:`recsys_assets.ml.split.temporal_split` does), or (fit part, validation
            part) given whole; ``None`` trains ``max_epochs`` epochs on ``train``.
        params: hyperparameters.
        progress: called after each epoch with its record (loss, validation metrics, seconds).
        placement: the ``tf.distribute`` strategy to train under (:mod:`recsys_assets.ml.distribute`);
            ``None``: TensorFlow's default (one device). Every worker of a multi-worker strategy calls
            this with the same data and gets the same model back.
        scratch: where the buckets' examples are saved (default: a temporary directory, deleted after).

    Raises:
        TrainingError: too few pairs, users or tracks to train anything meaningful.
    """
    if params.refit not in REFIT_MODES:
        raise TrainingError(f"refit={params.refit!r}: expected one of {', '.join(REFIT_MODES)}")
    streamed = isinstance(train, UserBuckets) and len(train) > 1 and not isinstance(validation_split, tuple)
    with tempfile.TemporaryDirectory(prefix="recsys-examples-", dir=scratch) as directory:
        work = Path(directory) if streamed else None
        data = _prepare(_parts(train, validation_split, work), tracks, params, work)
        return _train(data, params, progress, placement)


def _train(data: _Prepared, params: TwoTowerParams, progress, placement: Placement | None) -> TrainedTwoTower:
    import tensorflow as tf

    vocab, items, full = data.vocab, data.items, data.full
    n_features = full.state["user_features"].shape[1]
    strategy = placement.strategy if placement is not None else None
    tf.keras.utils.set_random_seed(params.seed)
    model = _build_model(vocab, items, n_features, params, strategy)
    runs: list[_EpochEnd] = []
    prior, prior_scores = 0.0, []
    session_weight, session_scores = 0.0, []
    fit_embeddings = None
    if data.fit is None:
        runs.append(_fit(model, full, items, vocab, params, params.max_epochs, None, progress, placement=placement))
        best_epoch = runs[-1].best_epoch
    else:
        validation = data.validation
        fit = _fit(
            model, data.fit, items, vocab, params, params.max_epochs,
            validation if len(validation.users) else None, progress, placement=placement,
        )  # fmt: skip
        runs.append(fit)
        best_epoch = max(fit.best_epoch, 1)
        log_q = _log_q(data.fit.counts)
        if params.popularity_prior and len(validation.users):
            prior, prior_scores = _pick_prior(model, vocab, items, data.fit.state, validation, log_q, params)
            log.info("popularity prior on the validation split: %s -> alpha %s", prior_scores, prior)
        if params.history_length and params.session_length and len(validation.users):
            session_weight, session_scores = _pick_session(
                model, vocab, items, data.fit.state, training_pairs(data.fit_sample), data.val_sample, validation,
                params, prior, log_q,
            )  # fmt: skip
        fit_embeddings = with_prior(*_embeddings(model, vocab, items, data.fit.state, params),
                                    params.temperature * prior, log_q)  # fmt: skip
        if params.refit == "warm":
            epochs = params.refit_epochs
            runs.append(_fit(model, full, items, vocab, params, epochs, None, progress, "refit", placement))
        elif params.refit == "scratch":
            tf.keras.utils.set_random_seed(params.seed)
            model = _build_model(vocab, items, n_features, params, strategy)
            runs.append(_fit(model, full, items, vocab, params, best_epoch, None, progress, "refit", placement))
    user_emb, item_emb = _embeddings(model, vocab, items, full.state, params)
    user_emb, item_emb = with_prior(user_emb, item_emb, params.temperature * prior, _log_q(full.counts))
    seconds = sum(r.seconds for r in runs)
    examples = sum(r.examples for r in runs)
    return TrainedTwoTower(
        params=params,
        vocab=vocab,
        item_frame=items,
        user_features=full.state["user_features"],
        user_embeddings=user_emb,
        item_embeddings=item_emb,
        model=model,
        history=[h for r in runs for h in r.history],
        best_epoch=best_epoch,
        popularity_prior=prior,
        prior_scores=prior_scores,
        train_seconds=seconds,
        examples_per_second=examples / seconds if seconds else 0.0,
        pairs=data.pairs,
        user_history=full.state.get("history"),
        session_weight=session_weight,
        session_scores=session_scores,
        fit_embeddings=fit_embeddings,
    )


def params_dict(params: TwoTowerParams) -> dict:
    return asdict(params)
