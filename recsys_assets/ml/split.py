"""The temporal holdout protocols of the evaluation (exact, so numbers compare across systems).

- *global temporal* (the gate's default): sort the positive interactions by ``played_at``; the cutoff
  is the ``played_at`` of the interaction at index ⌊0.9·n⌋ (0-based); train is ``played_at < cutoff``,
  holdout ``played_at ≥ cutoff``.
- *per-user temporal*: for each user with at least 5 positive interactions, the latest ⌈0.2·n⌉ are
  held out (ties in ``played_at`` broken by ``track_id`` compared as strings); users with fewer keep
  all of theirs in train.

Positive interactions are de-duplicated on (user, track, ``played_at``) before splitting. Training uses
the distinct (user, track) pairs of the train side. The holdout keeps organic listening only: plays
that answer our own recommendations would favour the model that made them (the champion). The same
functions carve the validation split out of the train side for early stopping.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl

from recsys_assets.ml.buckets import UserBuckets

PROTOCOLS = ("global", "user")
HOLDOUT_FRACTION_GLOBAL = 0.1
HOLDOUT_FRACTION_USER = 0.2
MIN_USER_INTERACTIONS = 5


class SplitError(ValueError):
    """The data cannot be split as the protocol says; the message says why."""


@dataclass(frozen=True)
class Split:
    protocol: str
    train: pl.DataFrame  # positive interactions (user_id, track_id, played_at, …) of the train side
    holdout: pl.DataFrame
    cutoff: datetime | None  # the global protocol's cutoff

    def sizes(self) -> dict[str, int]:
        return {
            "train_interactions": self.train.height,
            "holdout_interactions": self.holdout.height,
            "train_pairs": self.train.select("user_id", "track_id").n_unique(),
            "train_users": self.train["user_id"].n_unique(),
            "train_tracks": self.train["track_id"].n_unique(),
        }


def positives(interactions: pl.DataFrame) -> pl.DataFrame:
    """Positive interactions de-duplicated on (user, track, played_at), in a canonical order."""
    return interactions.unique(["user_id", "track_id", "played_at"], keep="first").sort(
        "played_at", "user_id", "track_id"
    )


def global_temporal_split(interactions: pl.DataFrame, fraction: float = HOLDOUT_FRACTION_GLOBAL) -> Split:
    """Split at the ``played_at`` of the interaction at index ⌊(1 - fraction)·n⌋.

    Raises:
        SplitError: too few interactions, or every timestamp equal (nothing would be held out
            or nothing trained on).
    """
    df = positives(interactions)
    return _at_cutoff(df, global_cutoff(df["played_at"], fraction))


def global_cutoff(played_at: pl.Series, fraction: float = HOLDOUT_FRACTION_GLOBAL) -> datetime:
    """The global protocol's cutoff: the ``played_at`` at index ⌊(1 - fraction)·n⌋ of the positives'
    timestamps (``played_at``: those of :func:`positives`, in any order; :func:`bucket_cutoff` finds
    the same over user buckets).

    Raises:
        SplitError: fewer than 2 interactions, or none before the cutoff (identical timestamps?).
    """
    n = len(played_at)
    _check_size(n)
    ordered = played_at.sort()
    cutoff = ordered[math.floor((1 - fraction) * n)]
    _check_trainable(n, ordered[0], cutoff)
    return cutoff


def _check_size(n: int) -> None:
    if n < 2:
        raise SplitError(f"{n} positive interactions: at least 2 are needed to split train and holdout")


def _check_trainable(n: int, earliest: datetime, cutoff: datetime) -> None:
    if earliest >= cutoff:
        raise SplitError(
            f"all {n} positive interactions are at or after the cutoff {cutoff} (identical timestamps?): "
            "nothing is left to train on; use the per-user protocol"
        )


def _at_cutoff(df: pl.DataFrame, cutoff: datetime) -> Split:
    return Split("global", df.filter(pl.col("played_at") < cutoff), df.filter(pl.col("played_at") >= cutoff), cutoff)


def per_user_temporal_split(
    interactions: pl.DataFrame, fraction: float = HOLDOUT_FRACTION_USER, min_interactions: int = MIN_USER_INTERACTIONS
) -> Split:
    """Hold out each eligible user's latest ⌈fraction·n⌉ positives.

    Raises:
        SplitError: no user has enough interactions to hold any out.
    """
    if interactions.is_empty():
        raise SplitError("no positive interactions to split")
    split = _latest_of_each_user(positives(interactions), fraction, min_interactions)
    if split.holdout.is_empty():
        raise SplitError(f"no user has {min_interactions} or more positive interactions: nothing can be held out")
    return split


def _latest_of_each_user(df: pl.DataFrame, fraction: float = HOLDOUT_FRACTION_USER,
                         min_interactions: int = MIN_USER_INTERACTIONS) -> Split:  # fmt: skip
    ranked = df.sort("user_id", "played_at", "track_id").with_columns(
        pl.int_range(pl.len()).over("user_id").alias("_rank"),
        pl.len().over("user_id").alias("_n"),
    )
    held = (pl.col("_n") >= min_interactions) & (
        pl.col("_rank") >= pl.col("_n") - (pl.col("_n") * fraction).ceil().cast(pl.Int64)
    )
    holdout = ranked.filter(held).drop("_rank", "_n").sort("played_at", "user_id", "track_id")
    train = ranked.filter(~held).drop("_rank", "_n").sort("played_at", "user_id", "track_id")
    return Split("user", train, holdout, None)


def temporal_split(interactions: pl.DataFrame, protocol: str) -> Split:
    """The protocol's split, with an organic holdout (see :func:`organic_holdout`)."""
    if protocol == "global":
        return organic_holdout(global_temporal_split(interactions))
    if protocol == "user":
        return organic_holdout(per_user_temporal_split(interactions))
    raise SplitError(f"protocol={protocol!r}: expected one of {', '.join(PROTOCOLS)}")


def organic_holdout(split: Split) -> Split:
    """Keep only organic listening in the holdout.

    Plays and likes that answer our own recommendations (``organic`` false) would favour the model
    that made those recommendations, the champion: the holdout measures what users find on their
    own. They stay out of the train side too (they happened after the cutoff).
    """
    if "organic" not in split.holdout.columns:
        return split
    return Split(split.protocol, split.train, split.holdout.filter(pl.col("organic")), split.cutoff)


def recent(train: pl.DataFrame | UserBuckets, days: int) -> pl.DataFrame | UserBuckets:
    """The rows of ``train`` (a table, or its user buckets) in its last ``days`` days (0: all of them):
    a training window.

    Only the model's training sees the window; the evaluation, the seen lists and the popularity keep
    the whole train side, so a model trained on a window is judged on the same users and events as
    one trained on everything, and is served without the tracks its users heard before the window.
    """
    if days <= 0:
        return train
    last = train.last("played_at") if isinstance(train, UserBuckets) else train["played_at"].max()
    return train if last is None else train.filter(pl.col("played_at") >= last - timedelta(days=days))


def validation_split(train: pl.DataFrame, protocol: str) -> Split:
    """The validation split for early stopping: the same protocol applied to the train side."""
    return temporal_split(train, protocol)


def bucket_cutoff(buckets: UserBuckets, fraction: float = HOLDOUT_FRACTION_GLOBAL) -> datetime:
    """:func:`global_cutoff` of a table cut into user buckets, exactly, without holding every timestamp:
    the positives counted per hour over the buckets first, then the timestamps of the hour that holds
    the cut gathered and ranked. Two readings of the buckets' keys; memory: an hour's interactions."""
    keys = ["user_id", "track_id", "played_at"]
    hour = pl.col("played_at").dt.truncate("1h").alias("hour")
    per_bucket = [
        b.unique().group_by(hour).agg(pl.len().alias("len"), pl.col("played_at").min().alias("earliest"))
        for b in buckets.read(keys)
    ]
    counts = (
        pl.concat(per_bucket)
        .group_by("hour")
        .agg(pl.col("len").sum(), pl.col("earliest").min())
        .sort("hour")
        .with_columns(pl.col("len").cum_sum().alias("upto"))
    )
    n = int(counts["len"].sum()) if counts.height else 0
    _check_size(n)
    index = math.floor((1 - fraction) * n)
    at = counts.filter(pl.col("upto") > index).row(0, named=True)
    within = pl.concat([b.unique().filter(hour == at["hour"])["played_at"] for b in buckets.read(keys)]).sort()
    cutoff = within[index - (at["upto"] - at["len"])]
    _check_trainable(n, counts["earliest"][0], cutoff)
    return cutoff


def bucket_splits(buckets: UserBuckets, protocol: str) -> Iterator[Split]:
    """The protocol's split of a table cut into user buckets, one bucket's :class:`Split` at a time: the
    same rows as :func:`temporal_split` of the whole table (the global protocol's cutoff is taken over
    every bucket's timestamps first; the per-user protocol is each user's own). Raises
    :class:`SplitError` as :func:`temporal_split` does, the per-user protocol's after the last bucket."""
    if protocol not in PROTOCOLS:
        raise SplitError(f"protocol={protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    if protocol == "global":
        cutoff = bucket_cutoff(buckets)
    held = 0
    for bucket in buckets:
        df = positives(bucket)
        split = _at_cutoff(df, cutoff) if protocol == "global" else _latest_of_each_user(df)
        held += split.holdout.height
        yield organic_holdout(split)
    if protocol == "user" and not held:
        raise SplitError(f"no user has {MIN_USER_INTERACTIONS} or more positive interactions: nothing can be held out")


def data_hash(interactions: pl.DataFrame) -> str:
    """A digest of the interactions' (user, track, time) content, independent of row order."""
    keyed = positives(interactions).select("user_id", "track_id", "played_at")
    digest = hashlib.sha256()
    digest.update(str(keyed.height).encode())
    digest.update(keyed.hash_rows(seed=0).sort().to_numpy().tobytes())
    return digest.hexdigest()[:16]
