"""Prepared data: Parquet datasets under ``<storage root>/prepared``, on local disk or in object storage.

The root is ``RECSYS_STORAGE_URI`` (default ``$RECSYS_HOME``): a ``pathlib.Path``, or for
``s3://bucket/prefix`` a ``upath.UPath`` (universal_pathlib over fsspec/s3fs) with the same
interface, so listing, reading and writing are one code path. Parquet is written by polars into the
path's file object, and read by polars' own object-store reader (its native S3 support: projection
and predicate pushdown, ranged reads) with the credentials and endpoint of the ``AWS_*`` variables.

A partitioned dataset is a directory of files, one per partition: a range of landed batches,
``batches-<first>-<last>.parquet`` (the stem is the Dagster partition key). A file appears only once it
is complete (written aside, then renamed), so a crash never leaves half a file, and materializing a
partition again replaces its file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

FILE_RE = re.compile(r"^batches-(\d{10})-(\d{10})\.parquet$")


@dataclass(frozen=True, order=True)
class BatchFile:
    first: int
    last: int
    path: Path

    @property
    def stem(self) -> str:
        return self.path.name.removesuffix(".parquet")


def batch_range_key(first: int, last: int) -> str:
    """The name of the range of landed batches ``first..last``: its file's stem and its partition key."""
    return f"batches-{first:010d}-{last:010d}"


def parse_batch_range_key(key: str) -> tuple[int, int]:
    """``(first, last)`` of a :func:`batch_range_key`.

    Raises:
        ValueError: ``key`` is not one.
    """
    match = FILE_RE.match(f"{key}.parquet")
    if not match:
        raise ValueError(f"{key!r} is not a batch range (batches-<first>-<last>, ten digits each)")
    return int(match[1]), int(match[2])


def batch_file_name(first: int, last: int) -> str:
    return f"{batch_range_key(first, last)}.parquet"


def is_remote(path: Path) -> bool:
    """Whether ``path`` is in object storage (a ``UPath`` with a protocol other than ``file``)."""
    return getattr(path, "protocol", "") not in ("", "file", "local")


def write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write a file so that readers see either nothing or all of it: locally aside, then renamed;
    in object storage by one upload (an object appears whole when its upload completes).
    ``write`` receives a binary file object."""
    if is_remote(path):
        with path.open("wb") as f:
            write(f)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> None:
    """Write ``df`` to ``path`` so that readers see either nothing or the whole file."""
    write_atomic(path, lambda f: df.write_parquet(f, compression="zstd", statistics=True))


def write_json_atomic(data: Any, path: Path) -> None:
    text = json.dumps(data, indent=2, default=str).encode()
    write_atomic(path, lambda f: f.write(text))


def remove_tree(path: Path) -> None:
    """Delete a directory (or prefix) and everything under it; nothing if it is not there."""
    if is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            path.fs.rm(path.path, recursive=True)
        return
    shutil.rmtree(path, ignore_errors=True)


def move_file(source: Path, target: Path) -> None:
    """Move a finished file into place: a rename on local disk (atomic), a server-side copy then a
    delete in object storage (an object appears whole)."""
    if is_remote(target):
        target.fs.mv(source.path, target.path)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)


def copy_tree(source: Path, target: Path) -> None:
    """Copy every file under ``source`` to the same place under ``target``, either side local or in
    object storage (a model version that a training pod exported, on its way to the step that logs it)."""
    for path in sorted(source.rglob("*")):
        if path.is_file():
            relative = path.relative_to(source) if not is_remote(source) else Path(path.path).relative_to(source.path)
            write_atomic(target / str(relative), lambda f, path=path: _copy_from(path, f))


def _copy_from(path: Path, out) -> None:
    with path.open("rb") as f:
        shutil.copyfileobj(f, out, length=8 << 20)


def spark_uri(path: Path) -> str:
    """What Spark's readers and writers take for ``path``: ``file:///…``, or ``s3a://bucket/key``
    (Hadoop's S3 connector) for an object in S3."""
    if not is_remote(path):
        # Not Path.as_uri(): Hadoop does not decode its percent-escapes (a Spark partition directory
        # is named `key=value`).
        return f"file://{Path(path).absolute()}"
    if path.protocol in ("s3", "s3a"):
        return f"s3a://{path.path}"
    return path.as_uri()


def parquet_parts(directory: Path) -> list[Path]:
    """The Parquet files a Spark job wrote into ``directory`` (its ``part-*`` files), in name order."""
    if not directory.exists():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith("part-") and p.name.endswith(".parquet"))


def polars_source(path: Path) -> str:
    """What polars' readers take for ``path``: the path, or the object's URI."""
    return str(path) if not is_remote(path) else path.as_uri()


def scan_parquet(paths: Path | list[Path]) -> pl.LazyFrame:
    """Parquet files, lazily, wherever they are (polars' native object-store reader for URIs)."""
    many = paths if isinstance(paths, list) else [paths]
    return pl.scan_parquet([polars_source(p) for p in many])


def read_parquet(path: Path) -> pl.DataFrame:
    return scan_parquet(path).collect()


def plan_extraction(batches: pl.DataFrame, rows_per_file: int) -> list[tuple[int, int, int]]:
    """Group consecutive landed batches into files of about ``rows_per_file`` rows.

    Args:
        batches: the ingest log (``batch_id``, ``landed``) of the batches to extract, in order (polars).
        rows_per_file: target rows per file; a batch larger than that gets a file of its own.

    Returns:
        ``(first_batch, last_batch, rows)`` per file.
    """
    plan: list[tuple[int, int, int]] = []
    first = last = None
    rows = 0
    for batch_id, landed in batches.select("batch_id", "landed").iter_rows():
        if first is not None and rows + landed > rows_per_file:
            plan.append((first, last, rows))
            first, rows = None, 0
        first = batch_id if first is None else first
        last = batch_id
        rows += landed
    if first is not None:
        plan.append((first, last, rows))
    return plan


class PreparedStore:
    """The prepared datasets of one deployment.

    Args:
        root: the ``prepared`` directory: a path, or a URI (``s3://bucket/prefix/prepared``).
    """

    def __init__(self, root: Path | str):
        from recsys_core.settings import storage_path

        self.root = root if isinstance(root, Path) else storage_path(root)

    def dataset_dir(self, name: str) -> Path:
        return self.root / name

    def table_path(self, name: str) -> Path:
        """A dataset written whole on each materialization (features, interactions)."""
        return self.root / f"{name}.parquet"

    def batch_files(self, name: str) -> list[BatchFile]:
        directory = self.dataset_dir(name)
        if not directory.exists():
            return []
        files = []
        for path in directory.iterdir():
            match = FILE_RE.match(path.name)
            if match:
                files.append(BatchFile(int(match[1]), int(match[2]), path))
        return sorted(files)

    def write_batch_file(self, name: str, first: int, last: int, df: pl.DataFrame) -> Path:
        path = self.dataset_dir(name) / batch_file_name(first, last)
        write_parquet_atomic(df, path)
        return path

    def batch_file(self, name: str, key: str) -> BatchFile:
        """The file of the batch range ``key`` in dataset ``name`` (it may not exist yet)."""
        first, last = parse_batch_range_key(key)
        return BatchFile(first, last, self.dataset_dir(name) / batch_file_name(first, last))

    def scan(self, name: str, keys: list[str] | None = None) -> pl.LazyFrame:
        """The files of an incremental dataset, lazily: all of them, or those of the batch ranges ``keys``
        (raises if there are none)."""
        files = self.batch_files(name)
        if keys is not None:
            wanted = set(keys)
            files = [f for f in files if f.stem in wanted]
        if not files:
            raise FileNotFoundError(
                f"the dataset {name} has no files in {self.dataset_dir(name)}: materialize it first"
            )
        return scan_parquet([f.path for f in files])

    def scan_table(self, name: str) -> pl.LazyFrame:
        path = self.table_path(name)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: materialize the asset {name} first")
        return scan_parquet(path)

    def write_table(self, name: str, df: pl.DataFrame) -> Path:
        path = self.table_path(name)
        write_parquet_atomic(df, path)
        return path

    def staging_dir(self, run_id: str, task: str) -> Path:
        """Where a Spark job of run ``run_id`` writes before the asset moves its output into place."""
        return self.root / "_staging" / f"{run_id}-{task}"

    def sidecar(self, name: str, batch: BatchFile) -> Path:
        """The JSON file beside a batch file that records per-batch statistics."""
        return self.dataset_dir(name) / f"{batch.stem}.stats.json"
