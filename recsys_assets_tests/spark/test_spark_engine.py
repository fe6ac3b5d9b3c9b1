"""The Spark engine through Dagster Pipes, on a real Spark standalone cluster: a master and two workers on
127.0.0.1, started from the PySpark distribution for this module and stopped by PID.

The partitions of a small simulated world are cleaned by one Spark application (a single-run
backfill), then the features and interactions by two more; the executors did the work (the
applications' event logs), the files equal what polars writes, and the asset checks pass as they do
for polars.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from recsys_assets.data import features as F
from recsys_assets.data.cleaning import clean_events
from recsys_assets_tests.assets.test_data_assets import FEATURES, metadata, one_partition_per_batch, run
from recsys_cli.stack.spark import StandaloneCluster
from recsys_core.contracts import TRACKS_SCHEMA, USERS_SCHEMA
from recsys_core.warehouse import Warehouse
from recsys_sim.simulation import simulate_history

END = datetime(2026, 2, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with StandaloneCluster(tmp_path_factory.mktemp("spark-cluster"), workers=2, cores=1, memory="1g") as started:
        yield started


def _event_log(directory: Path, app_id: str) -> list[dict]:
    """The application's events. Its last line may be cut short (seen once on a fresh machine), as
    Spark's history server allows: a line that does not parse is skipped, the events asserted on
    come long before it."""
    (path,) = [p for p in directory.iterdir() if p.name.startswith(app_id)]
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def test_the_preparation_runs_on_a_standalone_cluster_through_pipes(recsys_env, monkeypatch, cluster, tmp_path) -> None:
    events_dir = tmp_path / "spark-events"
    events_dir.mkdir()
    monkeypatch.setenv("RECSYS_PREP_ENGINE", "spark")
    monkeypatch.setenv("RECSYS_SPARK_MASTER", cluster.master_url)
    # One one-core executor per worker; the job starts once both have registered. The event log is
    # one plain JSON file per application.
    monkeypatch.setenv(
        "RECSYS_SPARK_CONF",
        f"spark.eventLog.enabled=true spark.eventLog.dir={events_dir.as_uri()} spark.eventLog.rolling.enabled=false "
        "spark.eventLog.compress=false spark.driver.host=127.0.0.1 spark.driver.bindAddress=127.0.0.1 "
        "spark.executor.cores=1 "
        "spark.executor.memory=512m spark.cores.max=2 spark.scheduler.minRegisteredResourcesRatio=1.0 "
        "spark.sql.shuffle.partitions=4",
    )
    warehouse = Warehouse(recsys_env.warehouse_uri)
    warehouse.init_schema()
    report = simulate_history(warehouse, recsys_env.home, users=80, tracks=300, days=21, seed=3, end=END, batch_rows=1)
    with dg.instance_for_test() as instance:
        keys = one_partition_per_batch(instance, report)
        assert len(keys) >= 3
        for key in keys:  # the extraction (the warehouse's, not the engine's)
            assert run(instance, assets=[dg.AssetKey("listening_events")], partition=key).success

        backfill = run(instance, assets=[dg.AssetKey("clean_listening_events")], between=(keys[0], keys[-1]))
        assert backfill.success
        events = backfill.asset_materializations_for_node("clean_listening_events")
        assert sorted(e.partition for e in events) == keys  # every partition, in one run…
        cleaned = {k: v.value for k, v in events[0].metadata.items()}
        assert cleaned["engine"] == "spark"
        assert cleaned["partitions"] == len(keys)
        assert cleaned["spark_master"] == cluster.master_url
        assert cleaned["dagster/row_count"] + cleaned["quarantined"] + cleaned["duplicates"] == cleaned["rows_in"]
        assert {e.check_name: e.passed for e in backfill.get_asset_check_evaluations()} == {
            "batch_conservation": True, "clean_events_schema": True, "clean_events_nulls_and_duplicates": True,
            "engine_conservation": True,  # reported by the Spark job through Pipes
        }  # fmt: skip
        clean_app = cleaned["spark_application_id"]  # …by one Spark application
        (engine_check,) = [e for e in backfill.get_asset_check_evaluations() if e.check_name == "engine_conservation"]
        assert engine_check.metadata["rows_in"].value == cleaned["rows_in"]
        assert engine_check.metadata["batches_broken"].value == 0

        features = run(instance, assets=FEATURES)
        assert features.success
        assert metadata(features, "training_interactions")["engine"] == "spark"

    # What Spark wrote is what polars writes, partition by partition and table by table.
    prepared = recsys_env.prepared_dir
    tracks = warehouse.table("tracks", TRACKS_SCHEMA)
    users = warehouse.table("users", USERS_SCHEMA)
    expected = []
    for key in keys:
        raw_path = prepared / "listening_events" / f"{key}.parquet"
        result = clean_events(pl.read_parquet(raw_path), tracks, users, now=datetime.now(UTC), origin=str(raw_path))
        got = pl.read_parquet(prepared / "clean_listening_events" / f"{key}.parquet")
        assert_frame_equal(got.sort("event_id"), result.clean.sort("event_id"))
        expected.append(result.clean)
    clean = pl.concat(expected).lazy()
    assert_frame_equal(
        pl.read_parquet(prepared / "training_interactions.parquet").sort("user_id", "track_id", "played_at"),
        F.training_interactions(clean).collect().sort("user_id", "track_id", "played_at"),
    )
    assert_frame_equal(pl.read_parquet(prepared / "track_features.parquet"), F.track_features(clean).collect())

    # The executors did the work: the cleaning's tasks ran on both workers' executors, not in the driver.
    log = _event_log(events_dir, clean_app)
    executors = {e["Executor ID"] for e in log if e["Event"] == "SparkListenerExecutorAdded"}
    ran_on = {e["Task Info"]["Executor ID"] for e in log if e["Event"] == "SparkListenerTaskEnd"}
    assert len(executors) == 2
    assert ran_on == executors
    # The master saw the three applications through to the end.
    names = [app["name"] for app in cluster.status()["completedapps"]]
    assert {"recsys-clean", "recsys-track_features", "recsys-training_interactions"} <= set(names)
