"""The warehouse the pipeline extracts from: a DuckDB file by default, PostgreSQL by URI.

Both run the same SQL (``contracts.DDL`` and the statements below); only connecting, bulk loading
and fetching differ, and live in the two small adapters at the bottom.

A DuckDB file admits one writing process at a time, and the simulator, the importers, the serving
feedback and the Dagster runs all write to it. So connections are short: open, do one unit of work
in one transaction, close; a process that finds the file locked retries with back-off until
``lock_timeout`` has passed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import polars as pl

from recsys_core.contracts import (
    DDL,
    LISTENING_EVENTS_SCHEMA,
    QUARANTINE_SCHEMA,
    RAW_EVENTS_SCHEMA,
    TRACKS_SCHEMA,
    USERS_SCHEMA,
    conform,
)

log = logging.getLogger(__name__)

EVENT_COLUMNS = list(RAW_EVENTS_SCHEMA)
QUARANTINE_COLUMNS = [*QUARANTINE_SCHEMA, "quarantined_at"]


class WarehouseError(RuntimeError):
    """The warehouse cannot be reached or refused an operation; the message says which and why."""


@dataclass(frozen=True)
class BatchReport:
    """What became of one landed batch: ``rows_in = landed + quarantined + duplicates``."""

    batch_id: int
    source: str
    origin: str
    rows_in: int
    landed: int
    quarantined: int
    duplicates: int
    skipped: bool = False  # the very same content was already landed: nothing was written

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Connection(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...
    def fetch(self, sql: str, params: Sequence[Any] = ()) -> pl.DataFrame: ...
    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any: ...
    def stage(self, name: str, df: pl.DataFrame, like: str) -> None: ...


class Warehouse:
    """One warehouse, addressed by URI: ``duckdb:///abs/path.duckdb`` or ``postgresql://…``.

    Args:
        uri: where the warehouse is.
        lock_timeout: how long to wait for a DuckDB file that another process holds.
    """

    def __init__(self, uri: str, lock_timeout: float = 120.0):
        self.uri = uri
        self.lock_timeout = lock_timeout
        if uri.startswith("duckdb://"):
            self.kind = "duckdb"
            self.path = Path(uri.removeprefix("duckdb://"))
        elif uri.startswith(("postgresql://", "postgres://")):
            self.kind = "postgres"
            self.path = None
        else:
            raise WarehouseError(f"RECSYS_WAREHOUSE_URI={uri!r}: expected duckdb:///path or postgresql://…")

    def __repr__(self) -> str:
        return f"Warehouse({self.kind}, {self.path or _redact(self.uri)})"

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A connection with an open transaction: committed on success, rolled back on error."""
        if self.kind == "duckdb":
            conn = _DuckDBConnection.open(self.path, self.lock_timeout)
        else:
            conn = _PostgresConnection.open(self.uri)
        try:
            conn.begin()
            yield conn
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()

    def init_schema(self) -> None:
        """Create the tables of the contract if they are missing."""
        with self.transaction() as conn:
            for statement in DDL:
                conn.execute(statement)
            conn.execute("CREATE SEQUENCE IF NOT EXISTS batch_ids START 1")

    # --- landing ------------------------------------------------------------------------------

    def land_events(
        self,
        events: pl.DataFrame,
        *,
        source: str,
        origin: str,
        rejected: pl.DataFrame | None = None,
        rows_in: int | None = None,
        content_hash: str | None = None,
    ) -> BatchReport:
        """Land one batch of typed events, all or nothing.

        Rows whose ``event_id`` is already in the warehouse, or repeats an earlier row of the same
        batch with the same values, are counted as duplicates; a repeat with different values is
        quarantined. ``rejected`` rows (those the reader could not type) are quarantined with their
        reason. The batch, its rows and its quarantine are written in one transaction.

        Args:
            events: rows in ``LISTENING_EVENTS_SCHEMA``.
            source: ``simulator``, ``movielens``, ``serving-feedback``, …
            origin: the file or process the rows came from.
            rejected: rows in ``QUARANTINE_SCHEMA`` (without ``batch_id``) to quarantine.
            rows_in: the number of input rows, when it differs from ``events`` + ``rejected``.
            content_hash: a digest of the input; a batch with a hash already landed is skipped.

        Returns:
            The batch's report.
        """
        events = conform(events, LISTENING_EVENTS_SCHEMA)
        rejected = conform(rejected if rejected is not None else pl.DataFrame(), QUARANTINE_SCHEMA)
        rows_in = rows_in if rows_in is not None else events.height + rejected.height

        # Within the batch: exact repeats are duplicates, conflicting repeats are quarantined.
        exact = events.unique(maintain_order=True)
        within_duplicates = events.height - exact.height
        repeated = pl.col("event_id").is_first_distinct().not_()
        conflicts = exact.filter(repeated)
        exact = exact.filter(repeated.not_())
        if conflicts.height:
            reason = "event_id={}: repeated in the batch with different values"
            rejected = pl.concat([rejected, _quarantine_rows(conflicts, origin, reason)])

        now = datetime.now(UTC)
        with self.transaction() as conn:
            if content_hash is not None:
                previous = conn.scalar("SELECT batch_id FROM ingest_batches WHERE content_hash = ?", [content_hash])
                if previous is not None:
                    return BatchReport(int(previous), source, origin, rows_in, 0, 0, rows_in, skipped=True)
            batch_id = int(conn.scalar("SELECT nextval('batch_ids')"))
            staged = exact.with_columns(
                pl.lit(now).cast(RAW_EVENTS_SCHEMA["ingested_at"]).alias("ingested_at"),
                pl.lit(batch_id).cast(pl.Int64).alias("batch_id"),
            ).select(EVENT_COLUMNS)
            conn.stage("staged_events", staged, like="listening_events")
            landed = conn.execute(
                f"INSERT INTO listening_events ({', '.join(EVENT_COLUMNS)}) "
                f"SELECT {', '.join(EVENT_COLUMNS)} FROM staged_events ON CONFLICT (event_id) DO NOTHING"
            )
            across_duplicates = staged.height - landed
            quarantined = self._insert_quarantine(conn, rejected, batch_id, stage="landing", at=now)
            report = BatchReport(
                batch_id=batch_id,
                source=source,
                origin=origin,
                rows_in=rows_in,
                landed=landed,
                quarantined=quarantined,
                duplicates=within_duplicates + across_duplicates,
            )
            if report.landed + report.quarantined + report.duplicates != rows_in:
                raise WarehouseError(
                    f"batch from {origin}: {rows_in} rows in but {report.landed} landed + "
                    f"{report.quarantined} quarantined + {report.duplicates} duplicates; nothing was written"
                )
            conn.execute(
                "INSERT INTO ingest_batches VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    batch_id,
                    source,
                    origin,
                    content_hash,
                    rows_in,
                    landed,
                    quarantined,
                    report.duplicates,
                    now,
                ],
            )
        log.info("landed batch %d from %s: %s", batch_id, origin, report.as_dict())
        return report

    @staticmethod
    def _insert_quarantine(conn: Connection, rows: pl.DataFrame, batch_id: int, stage: str, at: datetime) -> int:
        if rows.is_empty():
            return 0
        staged = conform(rows, QUARANTINE_SCHEMA).with_columns(
            pl.lit(batch_id).cast(pl.Int64).alias("batch_id"),
            pl.lit(stage).alias("stage"),
            pl.lit(at).cast(RAW_EVENTS_SCHEMA["ingested_at"]).alias("quarantined_at"),
        )
        conn.stage("staged_quarantine", staged.select(QUARANTINE_COLUMNS), like="quarantine")
        return conn.execute(
            f"INSERT INTO quarantine ({', '.join(QUARANTINE_COLUMNS)}) "
            f"SELECT {', '.join(QUARANTINE_COLUMNS)} FROM staged_quarantine"
        )

    def replace_quarantine(self, stage: str, batch_ids: Sequence[int], rows: pl.DataFrame) -> int:
        """Replace the ``stage`` quarantine of ``batch_ids`` with ``rows`` (which carry ``batch_id``).

        Re-running a stage on the same batches therefore never quarantines a row twice.
        """
        if not batch_ids:
            return 0
        now = datetime.now(UTC)
        with self.transaction() as conn:
            placeholders = ", ".join("?" for _ in batch_ids)
            conn.execute(
                f"DELETE FROM quarantine WHERE stage = ? AND batch_id IN ({placeholders})",
                [stage, *batch_ids],
            )
            if rows.is_empty():
                return 0
            staged = conform(rows, QUARANTINE_SCHEMA).with_columns(
                pl.lit(stage).alias("stage"),
                pl.lit(now).cast(RAW_EVENTS_SCHEMA["ingested_at"]).alias("quarantined_at"),
            )
            conn.stage("staged_quarantine", staged.select(QUARANTINE_COLUMNS), like="quarantine")
            return conn.execute(
                f"INSERT INTO quarantine ({', '.join(QUARANTINE_COLUMNS)}) "
                f"SELECT {', '.join(QUARANTINE_COLUMNS)} FROM staged_quarantine"
            )

    def upsert_catalog(self, tracks: pl.DataFrame | None = None, users: pl.DataFrame | None = None) -> dict[str, int]:
        """Insert tracks and users that are not in the catalogue yet (existing rows are kept)."""
        counts = {"tracks": 0, "users": 0}
        with self.transaction() as conn:
            for table, df, schema, key in (
                ("tracks", tracks, TRACKS_SCHEMA, "track_id"),
                ("users", users, USERS_SCHEMA, "user_id"),
            ):
                if df is None or df.is_empty():
                    continue
                df = conform(df, schema).unique(key, keep="first", maintain_order=True)
                conn.stage(f"staged_{table}", df, like=table)
                cols = ", ".join(schema)
                counts[table] = conn.execute(
                    f"INSERT INTO {table} ({cols}) SELECT {cols} FROM staged_{table} ON CONFLICT ({key}) DO NOTHING"
                )
        return counts

    # --- reading ------------------------------------------------------------------------------

    def fetch(self, sql: str, params: Sequence[Any] = ()) -> pl.DataFrame:
        with self.transaction() as conn:
            return conn.fetch(sql, params)

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self.transaction() as conn:
            return conn.scalar(sql, params)

    def batches_after(self, batch_id: int) -> pl.DataFrame:
        """The ingest log of every batch after ``batch_id``."""
        return self.fetch("SELECT * FROM ingest_batches WHERE batch_id > ? ORDER BY batch_id", [batch_id])

    def events_between(self, first_batch: int, last_batch: int) -> pl.DataFrame:
        """The landed events of batches ``first_batch..last_batch`` (inclusive), typed by the contract."""
        df = self.fetch(
            f"SELECT {', '.join(EVENT_COLUMNS)} FROM listening_events WHERE batch_id BETWEEN ? AND ?",
            [first_batch, last_batch],
        )
        return conform(df, RAW_EVENTS_SCHEMA)

    def table(self, name: str, schema: dict[str, pl.DataType]) -> pl.DataFrame:
        return conform(self.fetch(f"SELECT {', '.join(schema)} FROM {name}"), schema)


def _quarantine_rows(rows: pl.DataFrame, origin: str, reason: str) -> pl.DataFrame:
    """Quarantine rows of the event contract, keeping their values as JSON."""
    original = rows.select(pl.struct(pl.all()).struct.json_encode().alias("original"))["original"]
    frame = pl.DataFrame(
        {
            "origin": [origin] * rows.height,
            "event_id": rows["event_id"],
            "reason": [reason.format(eid) for eid in rows["event_id"]],
            "original": original,
        }
    )
    return conform(frame, QUARANTINE_SCHEMA)


def _redact(uri: str) -> str:
    """A URI without its password, for messages."""
    if "@" not in uri:
        return uri
    scheme, _, rest = uri.partition("://")
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


# --- adapters ---------------------------------------------------------------------------------


class _DuckDBConnection:
    def __init__(self, con: Any):
        self.con = con

    @classmethod
    def open(cls, path: Path, lock_timeout: float) -> _DuckDBConnection:
        import duckdb

        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + lock_timeout
        delay = 0.02
        while True:
            try:
                return cls(duckdb.connect(str(path)))
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise WarehouseError(f"cannot open the DuckDB warehouse {path}: {exc}") from exc
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 1.0)

    def begin(self) -> None:
        self.con.execute("BEGIN TRANSACTION").fetchall()

    def commit(self) -> None:
        import duckdb

        try:
            self.con.execute("COMMIT").fetchall()
        except duckdb.TransactionException as exc:  # two connections of one process wrote the same keys
            raise WarehouseError(f"the transaction conflicted with another one and was rolled back: {exc}") from exc

    def rollback(self) -> None:
        with contextlib.suppress(Exception):
            self.con.execute("ROLLBACK").fetchall()

    def close(self) -> None:
        self.con.close()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        result = self.con.execute(sql, list(params)).fetchall()
        # DML returns [(count,)]; DDL returns nothing.
        return int(result[0][0]) if result and len(result[0]) == 1 and isinstance(result[0][0], int) else 0

    def fetch(self, sql: str, params: Sequence[Any] = ()) -> pl.DataFrame:
        return pl.from_arrow(self.con.sql(sql, params=list(params) or None).to_arrow_table())

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self.con.execute(sql, list(params)).fetchall()
        return rows[0][0] if rows else None

    def stage(self, name: str, df: pl.DataFrame, like: str) -> None:
        self.con.register(f"{name}_arrow", df.to_arrow())
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT * FROM {name}_arrow").fetchall()
        self.con.unregister(f"{name}_arrow")


# PostgreSQL type OIDs → polars types, for the columns of an empty result.
_PG_TYPES = {
    16: pl.Boolean, 20: pl.Int64, 21: pl.Int16, 23: pl.Int32, 25: pl.Utf8, 700: pl.Float32, 701: pl.Float64,
    1043: pl.Utf8, 1082: pl.Date, 1114: pl.Datetime("us"), 1184: pl.Datetime("us", "UTC"), 1700: pl.Float64,
}  # fmt: skip


class _PostgresConnection:
    def __init__(self, con: Any):
        self.con = con

    @classmethod
    def open(cls, uri: str) -> _PostgresConnection:
        import psycopg

        try:
            return cls(psycopg.connect(uri, autocommit=False, connect_timeout=10))
        except psycopg.OperationalError as exc:
            raise WarehouseError(f"cannot connect to the PostgreSQL warehouse {_redact(uri)}: {exc}") from exc

    def begin(self) -> None:
        """psycopg opens the transaction implicitly at the first statement."""

    def commit(self) -> None:
        self.con.commit()

    def rollback(self) -> None:
        with contextlib.suppress(Exception):
            self.con.rollback()

    def close(self) -> None:
        self.con.close()

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self.con.cursor() as cur:
            cur.execute(self._sql(sql), list(params) or None)
            return max(cur.rowcount, 0)

    def fetch(self, sql: str, params: Sequence[Any] = ()) -> pl.DataFrame:
        with self.con.cursor() as cur:
            cur.execute(self._sql(sql), list(params) or None)
            columns = [d.name for d in cur.description]
            rows = cur.fetchall()
            if not rows:  # nothing to infer the types from: the result's own column types (as DuckDB gives)
                schema = {d.name: _PG_TYPES.get(d.type_code, pl.Utf8) for d in cur.description}
                return pl.DataFrame(schema=schema)
        return pl.DataFrame(rows, schema=columns, orient="row", infer_schema_length=None)

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self.con.cursor() as cur:
            cur.execute(self._sql(sql), list(params) or None)
            row = cur.fetchone()
        return None if row is None else row[0]

    def stage(self, name: str, df: pl.DataFrame, like: str) -> None:
        columns = ", ".join(df.columns)
        with self.con.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {name}")
            cur.execute(f"CREATE TEMP TABLE {name} (LIKE {like}) ON COMMIT DROP")
            buffer = io.BytesIO()
            df.write_csv(
                buffer,
                include_header=False,
                null_value="\\N",
                datetime_format="%Y-%m-%dT%H:%M:%S%.6f%:z",
                quote_style="non_numeric",
            )
            with cur.copy(f"COPY {name} ({columns}) FROM STDIN WITH (FORMAT csv, NULL '\\N')") as copy:
                copy.write(buffer.getvalue())
