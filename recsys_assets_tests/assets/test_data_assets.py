"""The data assets materialized through Dagster on a real embedded warehouse in a temp directory."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
import polars as pl
import pytest

from recsys_assets import checks
from recsys_assets.assets import features, ingestion, preparation
from recsys_sim.simulation import simulate_history
from recsys_assets.resources import build_resources
from recsys_core.warehouse import Warehouse

END = datetime(2026, 2, 1, tzinfo=UTC)
DATA_ASSETS = [*dg.load_assets_from_modules([ingestion, preparation, features])]
DATA_CHECKS = dg.load_asset_checks_from_modules([checks])


def materialize(settings, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [*DATA_ASSETS, *DATA_CHECKS, ingestion.warehouse_listening_events, ingestion.warehouse_catalog],
        resources=build_resources(settings),
        instance=instance,
    )


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    (event,) = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in event.metadata.items()}


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture
def warehouse(recsys_env) -> Warehouse:
    wh = Warehouse(recsys_env.warehouse_uri)
    wh.init_schema()
    return wh


def test_the_data_graph_runs_incrementally_and_conserves_rows(recsys_env, warehouse, instance) -> None:
    report = simulate_history(warehouse, recsys_env.home, users=150, tracks=600, days=14, seed=5, end=END)
    first = materialize(recsys_env, instance)
    assert first.success
    raw = metadata(first, "listening_events")
    assert raw["new_rows"] == report.events
    assert raw["dagster/row_count"] == report.events
    clean = metadata(first, "clean_listening_events")
    assert clean["new_rows_in"] == report.events
    assert clean["new_clean"] + clean["new_quarantined"] + clean["new_duplicates"] == report.events
    checks_passed = {e.check_name: e.passed for e in first.get_asset_check_evaluations()}
    assert checks_passed == {
        "batch_conservation": True,
        "clean_events_schema": True,
        "clean_events_nulls_and_duplicates": True,
    }

    # Nothing new: nothing extracted, nothing re-cleaned, no file added.
    again = materialize(recsys_env, instance)
    assert metadata(again, "listening_events")["new_rows"] == 0
    assert metadata(again, "clean_listening_events")["files_cleaned"] == 0
    assert metadata(again, "listening_events")["files"] == 1

    # A new batch with bad rows: only it is extracted; bad rows end in quarantine with reasons.
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
    third = materialize(recsys_env, instance)
    assert third.success
    assert metadata(third, "listening_events")["new_rows"] == landed.landed == 4
    cleaned = metadata(third, "clean_listening_events")
    assert (cleaned["new_clean"], cleaned["new_quarantined"]) == (1, 3)
    reasons = warehouse.fetch("SELECT reason FROM quarantine WHERE batch_id = ? ORDER BY reason", [landed.batch_id])[
        "reason"
    ]
    assert [r.split(":")[0] for r in reasons] == ["event_type=teleport", "ms_played=-3", "played_at=2036-01-30T00"]
    conservation = next(e for e in third.get_asset_check_evaluations() if e.check_name == "batch_conservation")
    assert conservation.passed
    assert conservation.metadata["batches_checked"].value == len(report.batches) + 1
    assert conservation.metadata["rows_in"].value == report.events + 5


def test_conservation_fails_when_a_row_goes_missing(recsys_env, warehouse, instance) -> None:
    simulate_history(warehouse, recsys_env.home, users=50, tracks=200, days=7, seed=1, end=END)
    assert materialize(recsys_env, instance).success
    store_dir = recsys_env.prepared_dir / "clean_listening_events"
    (clean_file,) = sorted(store_dir.glob("batches-*.parquet"))
    pl.read_parquet(clean_file).slice(1).write_parquet(clean_file)  # lose a row behind the pipeline's back
    result = dg.materialize(
        [*DATA_ASSETS, *DATA_CHECKS],
        resources=build_resources(recsys_env),
        instance=instance,
        selection=dg.AssetSelection.checks_for_assets("clean_listening_events"),
        raise_on_error=False,
    )
    assert not result.success  # the check is blocking: the run fails
    conservation = next(e for e in result.get_asset_check_evaluations() if e.check_name == "batch_conservation")
    assert not conservation.passed
    assert conservation.metadata["batches_broken"].value == 1


def test_features_describe_tracks_and_positives(recsys_env, warehouse, instance) -> None:
    simulate_history(warehouse, recsys_env.home, users=120, tracks=500, days=10, seed=2, end=END)
    materialize(recsys_env, instance)
    tracks = pl.read_parquet(recsys_env.prepared_dir / "track_features.parquet")
    positives = pl.read_parquet(recsys_env.prepared_dir / "training_interactions.parquet")
    assert tracks["popularity"].sum() == pytest.approx(1.0)
    assert positives.select(pl.struct("user_id", "track_id", "played_at").n_unique()).item() == positives.height
    assert (positives["weight"] > 0).all()
    assert not (recsys_env.prepared_dir / "user_features.parquet").exists()  # no asset writes it any more
