"""Every store on PostgreSQL (issue "Production topology", item 2): the Dagster instance (runs, event
logs, schedules through dagster-postgres), the MLflow backend store and the warehouse, on the
embedded PostgreSQL server. The real `recsys up` (Dagster webserver and daemon) runs its sensors and
one retrain; nothing is written to the SQLite or DuckDB files of the embedded default."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import psycopg
import pytest

from recsys_assets.stack.supervisor import free_port
from recsys_assets_tests.conftest import BIN
from recsys_assets_tests.test_closed_loop import SETTINGS_VARIABLES, wait_for
from recsys_core.control import ControlPlane
from recsys_core.registry import CHAMPION
from recsys_core.settings import load_settings
from recsys_core.warehouse import Warehouse

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_daemon_retrains_with_every_store_on_postgres(postgres_server, tmp_path: Path, monkeypatch) -> None:
    with psycopg.connect(postgres_server.get_uri(), autocommit=True) as conn:
        for name in ("pe_dagster", "pe_mlflow", "pe_warehouse"):
            conn.execute(f"CREATE DATABASE {name}")
    mlflow_uri = postgres_server.get_uri(database="pe_mlflow").replace("postgresql://", "postgresql+psycopg://", 1)
    gate = {
        "min_improvement": -1.0,
        "guards": {"recall@10": 1.0, "coverage@10": 1.0},
    }  # any candidate: the stores are tested
    permissive_gate = {"ops": {"model_evaluation": {"config": gate}}}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RECSYS_") and k not in SETTINGS_VARIABLES},
        "RECSYS_HOME": str(tmp_path / "home"),
        "RECSYS_DAGSTER_PORT": str(free_port()),
        "RECSYS_WAREHOUSE_URI": postgres_server.get_uri(database="pe_warehouse"),
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "RECSYS_DAGSTER_STORAGE_URI": postgres_server.get_uri(database="pe_dagster"),
        "RECSYS_SENSOR_INTERVAL_SECONDS": "5",
        "RECSYS_RETRAIN_RUN_CONFIG": json.dumps(permissive_gate),
    }
    settings = load_settings(env)
    assert settings.environment == "production"
    subprocess.run([str(BIN / "recsys"), "data", "simulate", "--users", "150", "--tracks", "300", "--days", "10",
                    "--seed", "3"], env=env, check=True, capture_output=True)  # fmt: skip
    proc = subprocess.Popen([str(BIN / "recsys"), "up", "--no-mlflow", "--no-bento", "--no-prometheus"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    registry = ControlPlane(mlflow_uri, settings.mlflow_artifact_root, tmp_path / "cache")
    for name, value in settings.child_env({}).items():  # this process reads the same Dagster instance
        monkeypatch.setenv(name, value)
    import dagster as dg

    def retrained() -> list:
        with dg.DagsterInstance.get() as instance:
            return instance.get_runs(filters=dg.RunsFilter(job_name="retrain", statuses=[dg.DagsterRunStatus.SUCCESS]))

    try:
        wait_for(lambda: any("Ctrl-C stops everything" in line for line in output), 300, "the stack", proc)
        # The new-data sensor bootstraps the first model: one retrain, run by the daemon.
        runs = wait_for(retrained, 600, "the bootstrap retrain", proc, 5.0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- recsys up said:\n{''.join(output[-60:])}") from None
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=10)
    assert [run.tags["recsys/trigger"] for run in runs] == ["bootstrap"]
    assert registry.by_alias(CHAMPION).version == 1  # in MLflow's PostgreSQL backend store
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        sensor = next(s for s in instance.all_instigator_state() if s.name == "new_data_sensor")
        assert instance.get_ticks(sensor.instigator_origin_id, sensor.selector_id)  # the ticks are there too
    warehouse = Warehouse(settings.warehouse_uri)
    assert warehouse.scalar("SELECT COUNT(*) FROM listening_events") > 0
    # Nothing went to the embedded default's files.
    home = Path(env["RECSYS_HOME"])
    assert not (home / "warehouse.duckdb").exists()
    assert not (home / "mlflow" / "mlflow.db").exists()
    assert not list((home / "dagster").rglob("*.db"))
