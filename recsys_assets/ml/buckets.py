"""User buckets: a table of interactions cut into user-disjoint parts, each small enough to hold in
memory (plain module: no Dagster, no TensorFlow).

The training's rules that look at one user at a time (the distinct pairs, the listening histories, the
query features, the per-user split, the seen lists) run on one bucket at a time with the same polars
functions that a whole table goes through; what spans users (the vocabulary, the item counts of the
logQ correction, the global protocol's cutoff, the last timestamp of a training window) is gathered
over the buckets in a small form: ids, counts, timestamps. So the training's peak memory is set by the
size of a bucket (``RECSYS_TRAIN_BUCKET_ROWS``), not by the number of events
(:mod:`recsys_assets.ml.two_tower`, docs/scaling.md).

A table in memory is cut in memory (:meth:`UserBuckets.of`: the tests, the demo's small worlds); a
Parquet table is cut by polars' streaming engine into one directory per bucket, never read whole
(:meth:`UserBuckets.scan`). A user's bucket is a hash of their id, so it is the same in both.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl

from recsys_core.settings import DEFAULT_TRAIN_BUCKET_ROWS as DEFAULT_BUCKET_ROWS

_SEED = 7  # the users' hash: any fixed seed; only the grouping depends on it


def bucket_count(rows: int, rows_per_bucket: int) -> int:
    """How many buckets hold ``rows`` interactions at most ``rows_per_bucket`` each, on average."""
    if rows_per_bucket < 1:
        raise ValueError(f"rows_per_bucket={rows_per_bucket}: expected 1 or more")
    return max(1, math.ceil(rows / rows_per_bucket))


def _bucket_of(count: int) -> pl.Expr:
    return (pl.col("user_id").cast(pl.String).hash(seed=_SEED) % count).alias("_bucket")


@dataclass(frozen=True)
class UserBuckets:
    """User-disjoint parts of one table of interactions; iterating reads one part at a time.

    ``parts``: data frames, or directories of Parquet files; ``where``: a filter applied to every part
    as it is read (a training window)."""

    parts: tuple[pl.DataFrame | Path, ...]
    where: pl.Expr | None = None

    @classmethod
    def of(cls, frame: pl.DataFrame, rows_per_bucket: int = DEFAULT_BUCKET_ROWS) -> UserBuckets:
        """``frame`` cut in memory (one part when it is no larger than a bucket)."""
        count = bucket_count(frame.height, rows_per_bucket)
        if count == 1:
            return cls((frame,))
        keyed = frame.with_columns(_bucket_of(count))
        parts = keyed.partition_by("_bucket", include_key=False, maintain_order=True, as_dict=True)
        return cls(tuple(parts[(b,)] for b in range(count) if (b,) in parts))

    @classmethod
    def scan(
        cls, source: str | Path | list, directory: Path, rows_per_bucket: int = DEFAULT_BUCKET_ROWS
    ) -> UserBuckets:
        """The Parquet file(s) ``source`` cut by polars' streaming engine into ``directory``
        (``bucket=<i>/`` each), without reading the table into memory."""
        lazy = pl.scan_parquet(source)
        rows = lazy.select(pl.len()).collect(engine="streaming").item()
        count = bucket_count(rows, rows_per_bucket)
        directory = Path(directory)
        lazy.sink_parquet(
            pl.PartitionBy(directory, key=_bucket_of(count).alias("bucket"), include_key=False),
            mkdir=True,
            engine="streaming",
        )
        parts = sorted(directory.glob("bucket=*"), key=lambda p: int(p.name.split("=")[1]))
        return cls(tuple(parts))

    def filter(self, predicate: pl.Expr) -> UserBuckets:
        """The same buckets, each read with only its rows where ``predicate`` holds."""
        return UserBuckets(self.parts, predicate if self.where is None else self.where & predicate)

    def __len__(self) -> int:
        return len(self.parts)

    def _lazy(self, part: pl.DataFrame | Path) -> pl.LazyFrame:
        lazy = part.lazy() if isinstance(part, pl.DataFrame) else pl.scan_parquet(Path(part) / "*.parquet")
        return lazy if self.where is None else lazy.filter(self.where)

    def __iter__(self) -> Iterator[pl.DataFrame]:
        return self.read()

    def read(self, columns: list[str] | None = None) -> Iterator[pl.DataFrame]:
        """Each bucket in turn (only ``columns``, read from the files alone when given)."""
        for part in self.parts:
            if isinstance(part, pl.DataFrame) and self.where is None:
                yield part if columns is None else part.select(columns)
            else:
                lazy = self._lazy(part)
                yield (lazy if columns is None else lazy.select(columns)).collect()

    def last(self, column: str = "played_at") -> datetime | None:
        """The largest value of ``column`` over every bucket (``None`` when all are empty); reads that
        column alone."""
        values = [self._lazy(part).select(pl.col(column).max()).collect().item() for part in self.parts]
        return max((v for v in values if v is not None), default=None)

    def collect(self) -> pl.DataFrame:
        """Every bucket in one frame (small tables and tests only)."""
        return pl.concat(list(self), how="vertical_relaxed")
