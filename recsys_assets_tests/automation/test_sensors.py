"""The sensors, evaluated through Dagster's sensor context on real embedded stores."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta

import dagster as dg
import httpx
import polars as pl
import pytest

from recsys_assets.defs.deployment.sensors import canary_look_key
from recsys_assets.resources import build_resources
from recsys_assets_tests.service.versions import tiny_version
from recsys_cli.runner import add_landed_partitions
from recsys_cli.stack.supervisor import free_port
from recsys_core.control import ControlPlane
from recsys_core.settings import load_settings
from recsys_core.warehouse import Warehouse

pytestmark = pytest.mark.slow
CUTOFF = datetime(2026, 5, 1, tzinfo=UTC)


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture
def firing_prometheus(tmp_path, monkeypatch) -> str:
    """The real Prometheus (Debian package) with one alert labelled retrain="true", firing from the start."""
    assert shutil.which("prometheus"), "prometheus is missing: `make test` installs it (scripts/test-setup.sh)"
    rules, config = tmp_path / "rules.yml", tmp_path / "prometheus.yml"
    rules.write_text(
        "groups:\n  - name: test\n    rules:\n      - alert: AlwaysFiring\n        expr: vector(1)\n"
        '        labels: { retrain: "true" }\n'
    )
    config.write_text(f"global:\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\n")
    url = f"http://127.0.0.1:{free_port()}"
    with (tmp_path / "prometheus.log").open("w") as log:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address={url.removeprefix('http://')}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _firing(url):
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "the test alert never fired"
            time.sleep(0.5)
        monkeypatch.setenv("PROMETHEUS_URL", url)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _firing(url: str) -> bool:
    try:
        response = httpx.get(f"{url}/api/v1/alerts")
    except httpx.HTTPError:
        return False
    if response.status_code != 200:  # 503 "Service Unavailable" (plain text) while it starts
        return False
    return any(alert["state"] == "firing" for alert in response.json()["data"]["alerts"])


def register_champion(settings, tmp_path, train_interactions: int) -> ControlPlane:
    registry = ControlPlane(settings.mlflow_tracking_uri, settings.mlflow_artifacts_dir, tmp_path / "cache")
    model_dir = tiny_version(tmp_path / "version")
    run_id = registry.start_run("champion", tags={})
    uri = registry.log_model(run_id, model_dir)
    registry.end_run(run_id)
    lineage = {"train_interactions": train_interactions, "max_played_at": CUTOFF.isoformat()}
    registry.register(model_uri=uri, run_id=run_id, lineage=lineage, reason="test", by="test")
    return registry


def plays(n: int, start: datetime, prefix: str = "e") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "event_id": [f"{prefix}{i}" for i in range(n)],
            "user_id": ["u"] * n,
            "track_id": ["t"] * n,
            "played_at": [start + timedelta(minutes=i) for i in range(n)],
            "event_type": ["play"] * n,
        }
    )


def tick(name: str, instance, settings, cursor=None):
    """One evaluation of the sensor ``name`` of the code location, with the environment as it is now
    (a fixture may have set PROMETHEUS_URL after ``settings`` was read)."""
    from recsys_assets.definitions import defs

    sensor = defs().resolve_sensor_def(name)
    resources = build_resources(load_settings())
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        result = sensor(context)
        return result, context.cursor


def land_and_prepare(instance, warehouse: Warehouse, frame: pl.DataFrame) -> None:
    """Land ``frame`` and prepare its partition (extract and clean it), as the sensors and automation would."""
    from recsys_assets.definitions import defs

    warehouse.init_schema()
    warehouse.land_events(frame, source="test", origin="t")
    job = defs().resolve_implicit_global_asset_job_def()
    for key in add_landed_partitions(instance, warehouse):
        selection = [dg.AssetKey("listening_events"), dg.AssetKey("clean_listening_events")]
        assert job.execute_in_process(instance=instance, partition_key=key, asset_selection=selection).success


def test_new_data_counts_prepared_partitions_and_fires_at_the_threshold_once(recsys_env, instance, tmp_path) -> None:
    register_champion(recsys_env, tmp_path, train_interactions=1000)
    warehouse = Warehouse(recsys_env.warehouse_uri)
    warehouse.init_schema()
    land_and_prepare(instance, warehouse, plays(150, CUTOFF + timedelta(hours=1)))
    land_and_prepare(instance, warehouse, plays(50, CUTOFF - timedelta(days=1), prefix="old"))
    # Landed but not prepared yet: it does not count until its partition is cleaned.
    warehouse.land_events(plays(500, CUTOFF + timedelta(hours=2), prefix="raw"), source="test", origin="t")

    result, cursor = tick("retrain_sensor", instance, recsys_env)
    assert isinstance(result, dg.SkipReason)
    assert result.skip_message.startswith("15.0% of 20%: 150 new positive events against 1,000")

    land_and_prepare(instance, warehouse, plays(60, CUTOFF + timedelta(days=1), prefix="more"))
    result, cursor = tick("retrain_sensor", instance, recsys_env, cursor)
    assert isinstance(result, dg.RunRequest)
    assert result.run_key == "new-data:champion-v1:attempt-1"
    assert result.tags["recsys/retrain"] == "true"
    assert result.tags["recsys/trigger"] == "new-data"
    assert result.tags["dagster/priority"] == "2"
    assert result.job_name == "retrain"
    assert result.tags["recsys/reason"].startswith("71.0% of 20%")  # the raw batch was prepared with it

    again, _ = tick("retrain_sensor", instance, recsys_env, cursor)
    assert isinstance(again, dg.SkipReason)
    assert "waiting for the retrain it requested" in again.skip_message


def test_the_retrain_sensor_backs_off_after_a_failed_retrain_run(recsys_env, instance, tmp_path) -> None:
    """A retrain that crashed (killed, a broken store) is retried after a wait that doubles, not at once."""
    register_champion(recsys_env, tmp_path, train_interactions=100)
    warehouse = Warehouse(recsys_env.warehouse_uri)
    warehouse.init_schema()
    land_and_prepare(instance, warehouse, plays(50, CUTOFF + timedelta(hours=1)))
    request, cursor = tick("retrain_sensor", instance, recsys_env)
    assert isinstance(request, dg.RunRequest)
    instance.add_run(dg.DagsterRun(job_name="retrain", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.FAILURE,
                                   tags={"dagster/run_key": request.run_key}))  # fmt: skip
    result, cursor = tick("retrain_sensor", instance, recsys_env, cursor)
    assert isinstance(result, dg.SkipReason)
    assert result.skip_message.startswith("backing off after 1 failed retrain run(s) until ")


def test_the_retrain_sensor_waits_for_a_canary(recsys_env, instance, tmp_path) -> None:
    registry = register_champion(recsys_env, tmp_path, train_interactions=10)
    run_id = registry.start_run("challenger", tags={})
    model_dir = tiny_version(tmp_path / "v2", seed=2)
    uri = registry.log_model(run_id, model_dir)
    registry.register(model_uri=uri, run_id=run_id, lineage={}, reason="test", by="test")
    Warehouse(recsys_env.warehouse_uri).init_schema()
    result, _ = tick("retrain_sensor", instance, recsys_env)
    assert isinstance(result, dg.SkipReason)
    assert result.skip_message == "challenger v2 is in canary: waiting for its decision"


def test_a_champion_registered_without_lineage_is_named_not_a_crash(recsys_env, instance, tmp_path) -> None:
    registry = ControlPlane(recsys_env.mlflow_tracking_uri, recsys_env.mlflow_artifacts_dir, tmp_path / "cache")
    run_id = registry.start_run("by-hand", tags={})
    uri = registry.log_model(run_id, tiny_version(tmp_path / "version"))
    registry.register(model_uri=uri, run_id=run_id, lineage={}, reason="by hand", by="test")
    Warehouse(recsys_env.warehouse_uri).init_schema()
    result, _ = tick("retrain_sensor", instance, recsys_env)
    assert result.skip_message == "champion v1 has no training cutoff: new data cannot be counted"


def test_without_a_champion_the_first_model_is_requested_once_data_is_prepared(recsys_env, instance) -> None:
    result, cursor = tick("retrain_sensor", instance, recsys_env)
    assert result.skip_message == "no champion and no prepared listening data yet"
    warehouse = Warehouse(recsys_env.warehouse_uri)
    land_and_prepare(instance, warehouse, plays(10, CUTOFF))
    result, cursor = tick("retrain_sensor", instance, recsys_env, cursor)
    assert result.run_key == "bootstrap-1"
    assert result.tags["recsys/trigger"] == "bootstrap"


def test_the_monthly_tick_retrains_once(recsys_env, instance, tmp_path, monkeypatch) -> None:
    register_champion(recsys_env, tmp_path, train_interactions=1000)
    Warehouse(recsys_env.warehouse_uri).init_schema()
    # A tick five seconds from now, then none for a minute (croniter's sixth field is the second).
    tick_at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=5)
    monkeypatch.setenv("RECSYS_RETRAIN_CRON", f"* * * * * {tick_at.second}")
    result, cursor = tick("retrain_sensor", instance, recsys_env)
    assert isinstance(result, dg.SkipReason)  # the champion is newer than the latest tick
    deadline = time.monotonic() + 10
    while datetime.now(UTC) < tick_at:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    result, cursor = tick("retrain_sensor", instance, recsys_env, cursor)
    assert isinstance(result, dg.RunRequest)
    assert result.tags["recsys/trigger"] == "monthly"
    assert result.run_key == f"monthly:{tick_at.isoformat()}"
    instance.add_run(dg.DagsterRun(job_name="retrain", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.SUCCESS,
                                   tags={"dagster/run_key": result.run_key}))  # fmt: skip
    again, _ = tick("retrain_sensor", instance, recsys_env, cursor)
    assert isinstance(again, dg.SkipReason)  # the same tick is answered once


def test_warehouse_sensor_adds_a_partition_per_new_range_of_batches(recsys_env, instance) -> None:
    warehouse = Warehouse(recsys_env.warehouse_uri)
    warehouse.init_schema()
    result, cursor = tick("warehouse_sensor", instance, recsys_env)
    assert result.skip_message == "no new batch since batch 0"
    first = warehouse.land_events(plays(5, CUTOFF), source="test", origin="t")
    second = warehouse.land_events(plays(5, CUTOFF, prefix="f"), source="test", origin="t")
    result, cursor = tick("warehouse_sensor", instance, recsys_env, cursor)
    assert isinstance(result, dg.SensorResult)
    key = f"batches-{first.batch_id:010d}-{second.batch_id:010d}"
    (request,) = result.run_requests
    assert (request.run_key, request.partition_key) == (key, key)
    assert request.asset_selection == [dg.AssetKey("listening_events")]
    (added,) = result.dynamic_partitions_requests
    assert (added.partitions_def_name, list(added.partition_keys)) == ("ingest_batches", [key])
    instance.add_dynamic_partitions("ingest_batches", [key])  # what the daemon does with the request
    result, _ = tick("warehouse_sensor", instance, recsys_env, cursor)
    assert result.skip_message == f"no new batch since batch {second.batch_id}"


def test_an_extraction_that_failed_in_a_warehouse_outage_fails_clearly_and_the_next_tick_retries_it(
    recsys_env, instance, monkeypatch
) -> None:
    """The warehouse stops answering while a partition is extracted: the run fails naming the warehouse
    and why; once it answers again, the sensor asks for that partition again (a new run_key), and the
    retry extracts it."""
    from recsys_assets.definitions import defs

    warehouse = Warehouse(recsys_env.warehouse_uri)
    warehouse.init_schema()
    warehouse.land_events(plays(5, CUTOFF), source="test", origin="t")
    result, _ = tick("warehouse_sensor", instance, recsys_env)
    (request,) = result.run_requests
    instance.add_dynamic_partitions("ingest_batches", [request.partition_key])
    selection = [dg.AssetKey("listening_events")]
    with monkeypatch.context() as outage:  # the code location's warehouse does not answer during the run
        outage.setenv("RECSYS_WAREHOUSE_URI", f"postgresql://nobody@127.0.0.1:{free_port()}/gone")
        job = defs().resolve_implicit_global_asset_job_def()
        failed = job.execute_in_process(instance=instance, partition_key=request.partition_key,
                                        asset_selection=selection, raise_on_error=False)  # fmt: skip
    assert not failed.success
    (failure,) = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "WarehouseError" in str(failure.event_specific_data.error)
    assert "Connection refused" in str(failure.event_specific_data.error)

    retry, _ = tick("warehouse_sensor", instance, recsys_env)  # the warehouse answers again
    (again,) = retry.run_requests
    assert again.partition_key == request.partition_key
    assert again.run_key != request.run_key
    assert again.tags["recsys/retry"] == "true"
    assert not retry.dynamic_partitions_requests  # nothing new

    # The retry fails too: the next one waits (one extraction interval, then 2, 4 … 64).
    with monkeypatch.context() as outage:
        outage.setenv("RECSYS_WAREHOUSE_URI", f"postgresql://nobody@127.0.0.1:{free_port()}/gone")
        job = defs().resolve_implicit_global_asset_job_def()
        assert not job.execute_in_process(instance=instance, partition_key=again.partition_key,
                                          asset_selection=selection, raise_on_error=False).success  # fmt: skip
    waiting, _ = tick("warehouse_sensor", instance, recsys_env)
    assert isinstance(waiting, dg.SkipReason)
    wait = re.search(rf"{again.partition_key} is retried in (\d+)s", waiting.skip_message)
    assert wait is not None, waiting.skip_message
    assert 240 < int(wait.group(1)) <= 300  # the default interval
    monkeypatch.setenv("RECSYS_EXTRACT_MIN_INTERVAL_SECONDS", "1")
    deadline = time.monotonic() + 30
    while isinstance(retry := tick("warehouse_sensor", instance, recsys_env)[0], dg.SkipReason):
        assert time.monotonic() < deadline, retry.skip_message
        time.sleep(0.2)
    (again,) = retry.run_requests
    assert again.partition_key == request.partition_key

    job = defs().resolve_implicit_global_asset_job_def()
    done = job.execute_in_process(instance=instance, partition_key=again.partition_key, asset_selection=selection)
    assert done.success
    result, _ = tick("warehouse_sensor", instance, recsys_env)
    assert isinstance(result, dg.SkipReason)  # retried once: nothing failed is left


def test_a_drifted_report_retrains_once(recsys_env, instance, tmp_path) -> None:
    register_champion(recsys_env, tmp_path, train_interactions=1000)
    Warehouse(recsys_env.warehouse_uri).init_schema()
    instance.report_runless_asset_event(
        dg.AssetMaterialization("drift_report", metadata={"drifted": False, "drift_share": 0.2})
    )
    result, cursor = tick("retrain_sensor", instance, recsys_env)
    assert isinstance(result, dg.SkipReason)
    instance.report_runless_asset_event(
        dg.AssetMaterialization("drift_report", metadata={"drifted": True, "drift_share": 0.6})
    )
    result, cursor = tick("retrain_sensor", instance, recsys_env, cursor)
    assert isinstance(result, dg.RunRequest)
    assert result.run_key.startswith("drift:")
    assert result.tags["recsys/trigger"] == "drift"
    instance.add_run(dg.DagsterRun(job_name="retrain", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.SUCCESS,
                                   tags={"dagster/run_key": result.run_key}))  # fmt: skip
    result, _ = tick("retrain_sensor", instance, recsys_env, cursor)
    assert isinstance(result, dg.SkipReason)  # that report is answered


def test_retrain_reasons_take_turns_alert_then_drift_then_new_data(
    recsys_env, instance, tmp_path, firing_prometheus
) -> None:
    """Three reasons wait for the one retrain slot: the alert first, then drift, then new data."""
    register_champion(recsys_env, tmp_path, train_interactions=100)
    warehouse = Warehouse(recsys_env.warehouse_uri)
    warehouse.init_schema()
    land_and_prepare(instance, warehouse, plays(150, CUTOFF + timedelta(hours=1)))
    instance.report_runless_asset_event(
        dg.AssetMaterialization("drift_report", metadata={"drifted": True, "drift_share": 0.6})
    )

    def launched(request: dg.RunRequest) -> None:
        tags = {"dagster/run_key": request.run_key}
        run_id = str(uuid.uuid4())
        instance.add_run(
            dg.DagsterRun(job_name="retrain", run_id=run_id, tags=tags, status=dg.DagsterRunStatus.SUCCESS)
        )

    alert, cursor = tick("retrain_sensor", instance, recsys_env)
    assert isinstance(alert, dg.RunRequest)
    assert alert.tags["recsys/trigger"] == "kpi-alert"
    assert alert.tags["dagster/priority"] == "4"
    assert alert.tags["recsys/reason"].startswith("AlwaysFiring firing since 20")
    assert firing_prometheus in alert.tags["recsys/reason"]
    launched(alert)

    drift, cursor = tick("retrain_sensor", instance, recsys_env, cursor)
    assert isinstance(drift, dg.RunRequest)
    assert drift.tags["recsys/trigger"] == "drift"
    launched(drift)

    new_data, cursor = tick("retrain_sensor", instance, recsys_env, cursor)
    assert isinstance(new_data, dg.RunRequest)
    assert new_data.tags["recsys/trigger"] == "new-data"
    launched(new_data)
    # The alert still fires, but its episode was answered: what is due now is the new data, still (the
    # champion did not change in this test).
    rest, _ = tick("retrain_sensor", instance, recsys_env, cursor)
    assert rest.tags["recsys/trigger"] == "new-data"


def test_canary_sensor_starts_the_canary_then_looks_as_traffic_comes_in(recsys_env, instance, tmp_path) -> None:
    """No analysis before the canary starts; then one look per `min_impressions` challenger impressions in
    the current step, with a key per step (each look is safe: the test is always valid)."""
    registry = register_champion(recsys_env, tmp_path, train_interactions=10)
    result, _ = tick("canary_sensor", instance, recsys_env)
    assert result.skip_message == "no challenger in canary"
    run_id = registry.start_run("challenger", tags={})
    uri = registry.log_model(run_id, tmp_path / "version")
    registry.register(model_uri=uri, run_id=run_id, lineage={}, reason="test", by="test")
    assert registry.serving_state().fraction == 0.0  # registered, not yet in canary

    result, _ = tick("canary_sensor", instance, recsys_env)
    assert result.run_key == "canary:v2:start"

    registry.set_canary(2, step=0, fraction=0.05, mode="ab", reason="test", by="test")
    Warehouse(recsys_env.warehouse_uri).init_schema()
    result, _ = tick("canary_sensor", instance, recsys_env)
    assert isinstance(result, dg.SkipReason)
    assert result.skip_message.startswith("challenger v2 at 5% (step 0): 0 of 5,000 impressions")


@pytest.mark.parametrize(
    ("impressions", "key"),
    [(0, None), (4999, None), (5000, "canary:v3:s1:1"), (12000, "canary:v3:s1:2")],
)
def test_canary_look_keys(impressions: int, key: str | None) -> None:
    assert canary_look_key(3, 1, impressions, 5000) == key
