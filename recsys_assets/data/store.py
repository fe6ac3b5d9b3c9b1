"""Prepared data on disk: Parquet datasets under ``$RECSYS_HOME/prepared``.

An incremental dataset is a directory of files named after the range of landed batches they hold,
``batches-<first>-<last>.parquet``. The files are the state: the next extraction starts after the
highest batch on disk, and a file appears only once it is complete (written aside, then renamed), so
a crash never leaves half a file and re-running the same batches writes nothing twice.
"""

from __future__ import annotations

import json
import os
import re
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


def batch_file_name(first: int, last: int) -> str:
    return f"batches-{first:010d}-{last:010d}.parquet"


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> None:
    """Write ``df`` to ``path`` so that readers see either nothing or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.write_parquet(tmp, compression="zstd", statistics=True)
    os.replace(tmp, path)


def write_json_atomic(data: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


class PreparedStore:
    """The prepared datasets of one ``RECSYS_HOME``.

    Args:
        root: the ``prepared`` directory.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

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

    def last_batch(self, name: str) -> int:
        """The highest landed batch held by the dataset (0 if it is empty)."""
        files = self.batch_files(name)
        return max((f.last for f in files), default=0)

    def write_batch_file(self, name: str, first: int, last: int, df: pl.DataFrame) -> Path:
        path = self.dataset_dir(name) / batch_file_name(first, last)
        write_parquet_atomic(df, path)
        return path

    def scan(self, name: str) -> pl.LazyFrame:
        """All the files of an incremental dataset, lazily (raises if there are none)."""
        files = self.batch_files(name)
        if not files:
            raise FileNotFoundError(
                f"the dataset {name} has no files in {self.dataset_dir(name)}: materialize it first"
            )
        return pl.scan_parquet([f.path for f in files])

    def scan_table(self, name: str) -> pl.LazyFrame:
        path = self.table_path(name)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: materialize the asset {name} first")
        return pl.scan_parquet(path)

    def write_table(self, name: str, df: pl.DataFrame) -> Path:
        path = self.table_path(name)
        write_parquet_atomic(df, path)
        return path

    def sidecar(self, name: str, batch: BatchFile) -> Path:
        """The JSON file beside a batch file that records per-batch statistics."""
        return self.dataset_dir(name) / f"{batch.stem}.stats.json"
