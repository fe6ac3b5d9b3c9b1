"""Landing batches: all or nothing, duplicates counted, conflicts quarantined, on DuckDB and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import polars as pl
import pytest

from recsys_core.contracts import TRACKS_SCHEMA
from recsys_core.warehouse import Warehouse, WarehouseError

T0 = datetime(2024, 5, 1, 12, tzinfo=UTC)


def events(*rows: tuple[str, str, str, int]) -> pl.DataFrame:
    """Events from (event_id, user_id, track_id, ms_played)."""
    return pl.DataFrame(
        {
            "event_id": [r[0] for r in rows],
            "user_id": [r[1] for r in rows],
            "track_id": [r[2] for r in rows],
            "played_at": [T0] * len(rows),
            "ms_played": [r[3] for r in rows],
            "event_type": ["play"] * len(rows),
        }
    )


def test_a_batch_lands_with_its_log(warehouse: Warehouse) -> None:
    report = warehouse.land_events(events(("e1", "u1", "t1", 10), ("e2", "u2", "t2", 20)), source="test", origin="f")
    assert (report.rows_in, report.landed, report.quarantined, report.duplicates) == (2, 2, 0, 0)
    log = warehouse.batches_after(0)
    assert log.select("batch_id", "rows_in", "landed").rows() == [(report.batch_id, 2, 2)]
    landed = warehouse.events_between(report.batch_id, report.batch_id).sort("event_id")
    assert landed["event_id"].to_list() == ["e1", "e2"]
    assert landed["played_at"].dtype == pl.Datetime("us", "UTC")
    assert landed["played_at"][0] == T0


def test_redelivered_events_are_duplicates_and_conflicts_are_quarantined(warehouse: Warehouse) -> None:
    first = warehouse.land_events(events(("e1", "u1", "t1", 10)), source="test", origin="f")
    second = warehouse.land_events(
        events(("e1", "u1", "t1", 10), ("e2", "u1", "t2", 5), ("e2", "u1", "t2", 5), ("e2", "u1", "t2", 7)),
        source="test",
        origin="g",
    )
    assert (second.landed, second.duplicates, second.quarantined) == (1, 2, 1)
    assert second.rows_in == second.landed + second.duplicates + second.quarantined
    assert warehouse.scalar("SELECT COUNT(*) FROM listening_events") == 2
    reason = warehouse.fetch("SELECT batch_id, reason, original FROM quarantine")
    assert reason["batch_id"].to_list() == [second.batch_id]
    assert reason["reason"][0] == "event_id=e2: repeated in the batch with different values"
    assert '"ms_played":7' in reason["original"][0]
    assert first.batch_id < second.batch_id


def test_same_content_hash_is_skipped(warehouse: Warehouse) -> None:
    batch = events(("e1", "u1", "t1", 10))
    first = warehouse.land_events(batch, source="test", origin="f", content_hash="abc")
    again = warehouse.land_events(batch, source="test", origin="f", content_hash="abc")
    assert again.skipped
    assert again.batch_id == first.batch_id
    assert warehouse.scalar("SELECT COUNT(*) FROM ingest_batches") == 1


def test_a_failed_batch_writes_nothing(warehouse: Warehouse) -> None:
    with pytest.raises(WarehouseError, match="nothing was written"):
        # rows_in that does not add up aborts the transaction after the inserts ran.
        warehouse.land_events(events(("e1", "u1", "t1", 10)), source="test", origin="f", rows_in=5)
    for table in ("listening_events", "ingest_batches", "quarantine"):
        assert warehouse.scalar(f"SELECT COUNT(*) FROM {table}") == 0


def test_spreadsheet_formulas_and_odd_text_are_kept_verbatim(warehouse: Warehouse) -> None:
    odd = ['=HYPERLINK("http://x","y")', "+1+2", "@SUM(A1)", 'a,"b"\nc', "naïve ♫ \\N"]
    batch = events(*[(f"e{i}", value, "t", 1) for i, value in enumerate(odd)])
    warehouse.land_events(batch, source="test", origin="f")
    stored = warehouse.fetch("SELECT event_id, user_id FROM listening_events ORDER BY event_id")
    assert stored["user_id"].to_list() == odd


def test_catalogue_upsert_keeps_existing_rows(warehouse: Warehouse) -> None:
    tracks = pl.DataFrame({"track_id": ["t1"], "artist_id": ["a1"], "genre": ["rock"]})
    assert warehouse.upsert_catalog(tracks=tracks)["tracks"] == 1
    changed = tracks.with_columns(pl.lit("pop").alias("genre"))
    assert warehouse.upsert_catalog(tracks=changed)["tracks"] == 0
    assert warehouse.table("tracks", TRACKS_SCHEMA)["genre"].to_list() == ["rock"]


def test_quarantine_of_a_stage_is_replaced_not_appended(warehouse: Warehouse) -> None:
    rows = pl.DataFrame({"batch_id": [1, 1], "origin": ["f", "f"], "reason": ["r1", "r2"]})
    warehouse.replace_quarantine("cleaning", [1], rows)
    warehouse.replace_quarantine("cleaning", [1], rows.head(1))
    assert warehouse.fetch("SELECT reason FROM quarantine")["reason"].to_list() == ["r1"]


def test_an_unknown_uri_scheme_is_named() -> None:
    with pytest.raises(WarehouseError, match="RECSYS_WAREHOUSE_URI='mysql://x'"):
        Warehouse("mysql://x")


def test_an_unreachable_postgres_names_the_host_without_the_password() -> None:
    wh = Warehouse("postgresql://user:secret@127.0.0.1:1/db")
    with pytest.raises(WarehouseError, match=r"postgresql://user:\*\*\*@127.0.0.1:1/db") as err:
        wh.init_schema()
    assert "secret" not in str(err.value)


def test_a_locked_duckdb_file_is_waited_for_then_reported(tmp_path) -> None:
    path = tmp_path / "w.duckdb"
    Warehouse(f"duckdb:///{path}").init_schema()
    # Another process holds the file open for writing.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, time; c = duckdb.connect({str(path)!r}); print('held', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WarehouseError, match="cannot open the DuckDB warehouse"):
            Warehouse(f"duckdb:///{path}", lock_timeout=0.5).init_schema()
    finally:
        holder.kill()
        holder.wait()
    Warehouse(f"duckdb:///{path}", lock_timeout=5).init_schema()


def test_an_empty_result_keeps_its_column_types(warehouse: Warehouse) -> None:
    """Both engines: joining on an empty result must not meet a column of type Null (the batch
    conservation check failed so on PostgreSQL)."""
    empty = warehouse.fetch("SELECT batch_id, COUNT(*) AS quarantined FROM quarantine GROUP BY batch_id")
    assert empty.height == 0
    assert empty.schema["batch_id"] == pl.Int64
    assert empty.schema["quarantined"] == pl.Int64
