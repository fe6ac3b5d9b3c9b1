"""The production topology, run for real (issue "Production topology", items 1 and 2):

- every store on PostgreSQL: the Dagster instance (runs, event logs, schedules through
  dagster-postgres), the MLflow backend store and the warehouse, on the embedded PostgreSQL server;
- every run artifact in object storage (``RECSYS_STORAGE_URI=s3://…``), on moto's S3 server started on
  loopback: the prepared data, the reports, the training's split, MLflow's artifacts (MLflow's own S3
  support) and Dagster's step outputs.

The real `recsys up` (Dagster webserver and daemon) runs its sensors and one retrain; then
`bentoml serve` loads the champion from the bucket. Nothing is written to the embedded default's files,
and nothing to local disk but caches and logs. (One stack for both stores: one retrain, not two.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import psycopg
import pytest

from recsys_assets_tests.conftest import BIN, REPO_ROOT
from recsys_assets_tests.test_closed_loop import SETTINGS_VARIABLES, wait_for
from recsys_cli.stack.services import bento_spec
from recsys_cli.stack.supervisor import Stack, free_port
from recsys_core.control import ControlPlane
from recsys_core.registry import CHAMPION
from recsys_core.settings import load_settings
from recsys_core.warehouse import Warehouse

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET = "recsys-artifacts"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """moto's S3 server (a real HTTP server speaking the S3 API) on a free loopback port, with one
    bucket; stopped by PID."""
    import boto3

    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip
    env = {
        "AWS_ACCESS_KEY_ID": "recsys-test",
        "AWS_SECRET_ACCESS_KEY": "recsys-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",  # boto3 (MLflow), s3fs and polars all read it
        "AWS_ALLOW_HTTP": "true",  # polars' object store refuses plain HTTP otherwise
    }
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="recsys-test", aws_secret_access_key="recsys-test")  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.2)
    try:
        yield SimpleNamespace(env=env, client=client)
    finally:
        proc.kill()
        proc.wait()
        log.close()


def bucket_keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"].removeprefix(prefix) for page in pages for item in page.get("Contents", [])]


def test_the_daemon_retrains_on_postgres_and_object_storage_and_the_service_loads_from_the_bucket(
    postgres_server, s3_server, tmp_path: Path, monkeypatch
) -> None:
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
        "RECSYS_TUNING_BUDGET_SECONDS": "5",  # the search's nested runs in the PostgreSQL-backed MLflow store
        "RECSYS_STORAGE_URI": f"s3://{BUCKET}/prod",
        **s3_server.env,
    }
    settings = load_settings(env)
    assert settings.environment == "production"
    assert settings.mlflow_artifact_root == f"s3://{BUCKET}/prod/mlflow"
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
            if instance.get_runs(filters=dg.RunsFilter(job_name="retrain", statuses=[dg.DagsterRunStatus.FAILURE])):
                log = Path(env["RECSYS_HOME"]) / "run" / "dagster-daemon.log"
                errors = [line for line in log.read_text().splitlines() if "Error" in line]
                raise AssertionError("the retrain failed:\n" + "\n".join(errors[-20:]))
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
    parent = registry.by_alias(CHAMPION).run_id  # the search's trials are nested under its training run
    trials = registry.client().search_runs([registry.experiment_id()], f"tags.mlflow.parentRunId = '{parent}'")
    assert trials
    assert all(t.data.tags["dagster.asset"] == "two_tower_model" for t in trials)
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        sensor = next(s for s in instance.all_instigator_state() if s.name == "retrain_sensor")
        assert instance.get_ticks(sensor.instigator_origin_id, sensor.selector_id)  # the ticks are there too
    warehouse = Warehouse(settings.warehouse_uri)
    assert warehouse.scalar("SELECT COUNT(*) FROM listening_events") > 0
    # Nothing went to the embedded default's files.
    home = Path(env["RECSYS_HOME"])
    assert not (home / "warehouse.duckdb").exists()
    assert not (home / "mlflow" / "mlflow.db").exists()
    assert not list((home / "dagster").rglob("*.db"))

    # Every run artifact is in the bucket.
    keys = bucket_keys(s3_server.client, "prod/")
    run_id = registry.by_alias(CHAMPION).run_id
    assert any(k.startswith("prepared/listening_events/batches-") for k in keys), keys
    assert any(k.startswith("prepared/clean_listening_events/batches-") for k in keys), keys
    assert {"prepared/track_features.parquet", "prepared/training_interactions.parquet"} <= set(keys)
    assert {f"runs/{run_id}/split/train.parquet", f"runs/{run_id}/split/holdout.parquet"} <= set(keys)
    assert any(k.startswith("reports/evaluation/") and k.endswith(".json") for k in keys), keys
    assert any(k.startswith("mlflow/") and k.endswith("/manifest.json") for k in keys), keys  # the model version
    assert any(k.startswith("dagster/") for k in keys), keys  # the assets' step outputs (Dagster's IO manager)
    # ... and none on local disk: what is there is caches (downloaded versions, the candidate's export
    # before MLflow had it, BentoML's build store, from which a Bento is containerized and pushed), logs,
    # process state and the simulator's world (the data source).
    data = {".parquet", ".json", ".html", ".npy", ".faiss", ".yaml"}
    local = [p.relative_to(home) for p in home.rglob("*") if p.is_file() and p.suffix in data]
    allowed = ("models", "run", "simulator", "dagster", "bentoml")
    assert [p for p in local if p.parts[0] not in allowed] == [], local
    assert not [p for p in local if p.parts[0] == "dagster" and p.name != "dagster.yaml"], local

    # The service loads the champion from the bucket (MLflow's S3 artifact store) and answers with it.
    settings = load_settings({**env, "RECSYS_BENTO_PORT": str(free_port())})
    stack = Stack(tmp_path / "serve", env=settings.child_env(env), cwd=REPO_ROOT)
    stack.start([bento_spec(settings)], timeout=180)
    try:
        answer = httpx.post(f"{settings.url('bento')}/recommend", json={"user_id": "u0001", "k": 5}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == 1
    finally:
        stack.stop(grace=20)
    assert list((home / "models" / "serving").glob("v1-*/manifest.json"))  # its cache of the bucket's files


def test_a_training_pods_chief_exports_to_the_bucket_and_the_step_takes_the_version_back(
    s3_server, tmp_path: Path, monkeypatch
) -> None:
    """The path of ``RECSYS_TRAIN_LAUNCHER=kubernetes`` without the cluster: a worker reads the train side
    from the bucket and, as the chief, exports the version and its outcome there (``--out s3://…``); the
    step's copy back (``copy_tree``) is the same version, and it serves."""
    from recsys_assets.data.store import copy_tree, write_parquet_atomic
    from recsys_assets.ml.split import global_temporal_split
    from recsys_assets.ml.train_worker import main as train_worker
    from recsys_assets_tests.ml.conftest import simulated_interactions
    from recsys_core.model_version import ModelArtifact
    from recsys_core.scoring import Ranker
    from recsys_core.settings import storage_path

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    _, interactions, tracks = simulated_interactions(users=60, tracks=200, days=10, seed=5)
    root = f"s3://{BUCKET}/exchange"
    write_parquet_atomic(global_temporal_split(interactions).train, storage_path(f"{root}/split/train.parquet"))
    write_parquet_atomic(tracks, storage_path(f"{root}/split/tracks.parquet"))
    params = {"embedding_dim": 8, "batch_size": 128, "max_epochs": 2, "min_train_pairs": 10}
    code = train_worker(["--train", f"{root}/split/train.parquet", "--tracks", f"{root}/split/tracks.parquet",
                         "--params", json.dumps(params), "--out", f"{root}/training/version",
                         "--result", f"{root}/training/result.json", "--strategy", "one-device"])  # fmt: skip
    assert code == 0
    keys = bucket_keys(s3_server.client, "exchange/training/")
    assert {"result.json", "version/manifest.json", "version/item_embeddings.npy"} <= set(keys), keys
    assert any(k.startswith("version/query_tower/") for k in keys), keys  # the SavedModel's directory too
    local = tmp_path / "candidate"
    copy_tree(storage_path(f"{root}/training/version"), local)
    assert sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()) == sorted(
        k.removeprefix("version/") for k in keys if k.startswith("version/")
    )
    outcome = json.loads(storage_path(f"{root}/training/result.json").read_text())
    assert outcome["strategy"] == "one-device"
    ranker = Ranker(ModelArtifact.load(local), version=1)
    assert len(ranker.recommend(str(interactions["user_id"][0]), 5).track_ids) == 5
