"""The data assets, partitioned per range of landed batches, on a real embedded warehouse in a temp directory."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
import polars as pl
import pytest

from recsys_assets.data.store import batch_range_key
from recsys_assets.defs.ingestion.partitions import ingest_batches
from recsys_cli.runner import add_landed_partitions
from recsys_core.warehouse import Warehouse
from recsys_sim.simulation import simulate_history

END = datetime(2026, 2, 1, tzinfo=UTC)
PARTITIONED = [dg.AssetKey("listening_events"), dg.AssetKey("clean_listening_events")]
FEATURES = [dg.AssetKey("track_features"), dg.AssetKey("training_interactions")]
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def _job() -> dg.JobDefinition:
    from recsys_assets.definitions import defs

    return defs().resolve_implicit_global_asset_job_def()


def run(instance, assets=PARTITIONED, partition: str | None = None, between: tuple[str, str] | None = None,
        cleaning: dict | None = None) -> dg.ExecuteInProcessResult:  # fmt: skip
    """One run of ``assets`` and their checks, for one partition or a range of them (a single-run backfill)."""
    tags = {RANGE_START: between[0], RANGE_END: between[1]} if between else None
    config = {"ops": {"clean_listening_events": {"config": cleaning}}} if cleaning else None
    return _job().execute_in_process(
        instance=instance, asset_selection=assets, partition_key=partition, tags=tags, run_config=config,
        raise_on_error=False,
    )  # fmt: skip


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    (event,) = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in event.metadata.items()}


def checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def status(instance, key: str) -> dg.AssetPartitionStatus | None:
    found = instance.get_status_by_partition(dg.AssetKey("clean_listening_events"), [key], ingest_batches) or {}
    return found.get(key)


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture
def warehouse(recsys_env) -> Warehouse:
    wh = Warehouse(recsys_env.warehouse_uri)
    wh.init_schema()
    return wh


def one_partition_per_batch(instance, report) -> list[str]:
    """The history's batches as partitions of one batch each (the sensor groups them by size)."""
    keys = [batch_range_key(b.batch_id, b.batch_id) for b in report.batches if b.landed]
    instance.add_dynamic_partitions(ingest_batches.name, keys)
    return keys


def test_a_partition_is_extracted_cleaned_and_checked_and_rows_are_conserved(recsys_env, warehouse, instance) -> None:
    report = simulate_history(warehouse, recsys_env.home, users=150, tracks=600, days=14, seed=5, end=END)
    (key,) = add_landed_partitions(instance, warehouse)  # what the warehouse sensor adds: one range here
    assert add_landed_partitions(instance, warehouse) == []  # nothing new landed: no partition
    first = run(instance, partition=key)
    assert first.success
    assert metadata(first, "listening_events")["dagster/row_count"] == report.events
    clean = metadata(first, "clean_listening_events")
    assert clean["rows_in"] == report.events
    assert clean["dagster/row_count"] + clean["quarantined"] + clean["duplicates"] == report.events
    assert checks(first) == {"batch_conservation": True, "clean_events_schema": True,
                             "clean_events_nulls_and_duplicates": True, "engine_conservation": True}  # fmt: skip

    # A new batch with bad rows: it becomes a partition of its own; bad rows end in quarantine with reasons.
    bad = pl.DataFrame(
        {
            "event_id": ["n1", "n2", "n3", "n4", "n4"],
            "user_id": ["u000001", "u000002", "u000003", "u000004", "u000004"],
            "track_id": ["t0000001", "t0000002", "t0000003", "t0000004", "t0000004"],
            "played_at": [END - timedelta(hours=1), END + timedelta(days=3650), END, END, END],
            "ms_played": [1000, 1000, -3, 1000, 1000],
            "event_type": ["play", "play", "play", "teleport", "teleport"],
        }
    )
    landed = warehouse.land_events(bad, source="test", origin="bad.csv")
    (new_key,) = add_landed_partitions(instance, warehouse)
    assert new_key == batch_range_key(landed.batch_id, landed.batch_id)
    second = run(instance, partition=new_key)
    assert second.success
    assert metadata(second, "listening_events")["dagster/row_count"] == landed.landed == 4
    cleaned = metadata(second, "clean_listening_events")
    assert (cleaned["dagster/row_count"], cleaned["quarantined"]) == (1, 3)
    reasons = warehouse.fetch("SELECT reason FROM quarantine WHERE batch_id = ? ORDER BY reason", [landed.batch_id])
    assert [r.split(":")[0] for r in reasons["reason"]] == ["event_type=teleport", "ms_played=-3",
                                                            "played_at=2036-01-30T00"]  # fmt: skip
    conservation = next(e for e in second.get_asset_check_evaluations() if e.check_name == "batch_conservation")
    assert conservation.passed
    assert conservation.metadata["batches_checked"].value == 1  # its own partition's batch only
    assert conservation.metadata["rows_in"].value == 5
    assert {status(instance, key), status(instance, new_key)} == {dg.AssetPartitionStatus.MATERIALIZED}


def test_a_backfill_after_a_rule_change_recleans_exactly_its_partitions(recsys_env, warehouse, instance) -> None:
    report = simulate_history(warehouse, recsys_env.home, users=80, tracks=300, days=42, seed=3, end=END, batch_rows=1)
    keys = one_partition_per_batch(instance, report)
    assert len(keys) >= 5
    for key in keys:
        assert run(instance, partition=key).success
    clean_dir = recsys_env.prepared_dir / "clean_listening_events"
    before = {k: (clean_dir / f"{k}.parquet").stat().st_mtime_ns for k in keys}
    quarantined = warehouse.scalar("SELECT COUNT(*) FROM quarantine WHERE stage = 'cleaning'")

    # The rule changes (plays longer than a minute are now absurd); a backfill of three partitions in one run.
    chosen = keys[1:4]
    backfill = run(instance, assets=[dg.AssetKey("clean_listening_events")], between=(chosen[0], chosen[-1]),
                   cleaning={"max_ms_played": 60_000})  # fmt: skip
    assert backfill.success
    events = backfill.asset_materializations_for_node("clean_listening_events")
    assert sorted(e.partition for e in events) == chosen  # one materialization per partition, in one run
    assert events[0].metadata["partitions"].value == 3
    after = {k: (clean_dir / f"{k}.parquet").stat().st_mtime_ns for k in keys}
    assert [k for k in keys if after[k] != before[k]] == chosen  # exactly those three were re-cleaned
    by_batch = warehouse.fetch(
        "SELECT batch_id, COUNT(*) AS n FROM quarantine WHERE stage = 'cleaning' AND reason LIKE 'ms_played=%' "
        "GROUP BY batch_id"
    )
    rechecked = {int(k.split("-")[1]) for k in chosen}
    assert set(by_batch["batch_id"].to_list()) <= rechecked  # the new rule applied to them, and only them
    assert by_batch["n"].sum() > 0
    assert warehouse.scalar("SELECT COUNT(*) FROM quarantine WHERE stage = 'cleaning'") > quarantined
    # Each of the three partitions ran its checks, and conservation holds for their batches.
    conservation = next(e for e in backfill.get_asset_check_evaluations() if e.check_name == "batch_conservation")
    assert conservation.passed
    assert conservation.metadata["batches_checked"].value == 3


def test_a_failed_partition_reruns_alone(recsys_env, warehouse, instance) -> None:
    report = simulate_history(warehouse, recsys_env.home, users=60, tracks=200, days=28, seed=8, end=END, batch_rows=1)
    keys = one_partition_per_batch(instance, report)
    for key in keys:
        assert run(instance, assets=[dg.AssetKey("listening_events")], partition=key).success
    raw_dir = recsys_env.prepared_dir / "listening_events"
    broken = keys[2]
    good = (raw_dir / f"{broken}.parquet").read_bytes()
    (raw_dir / f"{broken}.parquet").write_bytes(b"not parquet")  # a corrupt file behind the pipeline's back
    outcomes = {k: run(instance, assets=[dg.AssetKey("clean_listening_events")], partition=k).success for k in keys}
    assert outcomes == {k: k != broken for k in keys}
    assert status(instance, broken) == dg.AssetPartitionStatus.FAILED
    clean_dir = recsys_env.prepared_dir / "clean_listening_events"
    before = {k: (clean_dir / f"{k}.parquet").stat().st_mtime_ns for k in keys if k != broken}

    (raw_dir / f"{broken}.parquet").write_bytes(good)
    again = run(instance, assets=[dg.AssetKey("clean_listening_events")], partition=broken)
    assert again.success
    assert status(instance, broken) == dg.AssetPartitionStatus.MATERIALIZED
    assert {k: (clean_dir / f"{k}.parquet").stat().st_mtime_ns for k in before} == before  # the others untouched


def test_conservation_fails_when_a_row_goes_missing(recsys_env, warehouse, instance) -> None:
    simulate_history(warehouse, recsys_env.home, users=50, tracks=200, days=7, seed=1, end=END)
    (key,) = add_landed_partitions(instance, warehouse)
    assert run(instance, partition=key).success
    # The ingest log now says one more row came in than any stage holds: a row lost between stages.
    # (Dagster 1.13 cannot run a partitioned check alone, so the partition is cleaned again with it.)
    with warehouse.transaction() as conn:
        conn.execute("UPDATE ingest_batches SET rows_in = rows_in + 1 WHERE batch_id = 1")
    result = run(instance, assets=[dg.AssetKey("clean_listening_events")], partition=key)
    assert not result.success  # the check is blocking: the run fails
    conservation = next(e for e in result.get_asset_check_evaluations() if e.check_name == "batch_conservation")
    assert not conservation.passed
    assert conservation.metadata["batches_broken"].value == 1
    assert status(instance, key) == dg.AssetPartitionStatus.MATERIALIZED  # written, but its check failed


def test_features_describe_tracks_and_positives(recsys_env, warehouse, instance) -> None:
    simulate_history(warehouse, recsys_env.home, users=120, tracks=500, days=10, seed=2, end=END)
    (key,) = add_landed_partitions(instance, warehouse)
    assert run(instance, partition=key).success
    assert run(instance, assets=FEATURES).success
    tracks = pl.read_parquet(recsys_env.prepared_dir / "track_features.parquet")
    positives = pl.read_parquet(recsys_env.prepared_dir / "training_interactions.parquet")
    assert tracks["popularity"].sum() == pytest.approx(1.0)
    assert positives.select(pl.struct("user_id", "track_id", "played_at").n_unique()).item() == positives.height
    assert (positives["weight"] > 0).all()
