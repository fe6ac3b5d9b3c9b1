"""The code location loads, validates, and describes every asset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from recsys_assets_tests.conftest import BIN, REPO_ROOT

EXPECTED_ASSETS = {
    "listening_events",
    "clean_listening_events",
    "track_features",
    "training_interactions",
    "warehouse/listening_events",
    "warehouse/catalog",
}


def _defs() -> dg.Definitions:
    from recsys_assets.definitions import defs

    return defs()


def test_definitions_hold_the_pipeline_assets(recsys_env) -> None:
    keys = {k.to_user_string() for k in _defs().resolve_asset_graph().get_all_asset_keys()}
    assert keys >= EXPECTED_ASSETS


def test_every_asset_is_documented_and_grouped(recsys_env) -> None:
    for spec in _defs().resolve_all_asset_specs():
        assert spec.description, f"{spec.key.to_user_string()} has no description"
        assert spec.group_name, spec.key
        assert spec.group_name == spec.group_name.lower(), spec.key
        first_line = spec.description.strip().splitlines()[0]
        assert first_line[0].isupper(), first_line
        assert not first_line.lower().startswith(("train ", "run ", "compute ")), first_line


def test_the_conservation_check_blocks(recsys_env) -> None:
    graph = _defs().resolve_asset_graph()
    names = {key.name for key in graph.asset_check_keys}
    assert {"batch_conservation", "clean_events_schema", "clean_events_nulls_and_duplicates",
            "engine_conservation"} <= names  # fmt: skip
    from recsys_assets.defs.preparation.checks import batch_conservation

    (spec,) = batch_conservation.check_specs
    assert spec.asset_key == dg.AssetKey("clean_listening_events")
    assert spec.blocking
    assert spec.partitions_def is not None  # it runs per partition
    assert spec.partitions_def.name == "ingest_batches"


def test_the_event_data_is_partitioned_per_ingested_batch_range(recsys_env) -> None:
    graph = _defs().resolve_asset_graph()
    for name in ("listening_events", "clean_listening_events"):
        node = graph.get(dg.AssetKey(name))
        assert isinstance(node.partitions_def, dg.DynamicPartitionsDefinition), name
        assert node.partitions_def.name == "ingest_batches"
        assert node.backfill_policy == dg.BackfillPolicy.single_run(), name  # a backfill is one run
    assert graph.get(dg.AssetKey("training_interactions")).partitions_def is None  # reads every partition


def test_settings_are_read_when_the_definitions_load_not_at_import(recsys_env, monkeypatch) -> None:
    """Every module of the code location is imported first; settings changed afterwards still reach the
    definitions (the resources, the sensors' interval, the drift report's cadence, the retrain job)."""
    import importlib
    import pkgutil

    import recsys_assets.defs

    for module in pkgutil.walk_packages(recsys_assets.defs.__path__, "recsys_assets.defs."):
        importlib.import_module(module.name)
    from recsys_assets.definitions import defs

    monkeypatch.setenv("RECSYS_SENSOR_INTERVAL_SECONDS", "7")
    monkeypatch.setenv("RECSYS_RETRAIN_NEW_DATA_FRACTION", "0.35")
    monkeypatch.setenv("RECSYS_CANARY_STEPS", "0.1,0.3")
    monkeypatch.setenv("RECSYS_DRIFT_CRON", "*/5 * * * *")
    monkeypatch.setenv("RECSYS_RETRAIN_CRON", "0 4 2 * *")
    monkeypatch.setenv("RECSYS_RETRAIN_RUN_CONFIG", '{"ops": {"two_tower_model": {"config": {"max_epochs": 3}}}}')
    loaded = defs()
    for sensor in ("warehouse_sensor", "retrain_sensor", "canary_sensor", "registry_audit_sensor"):
        assert loaded.resolve_sensor_def(sensor).minimum_interval_seconds == 7, sensor
    assert loaded.resources["retrain_policy"].new_data_fraction == 0.35
    assert loaded.resources["retrain_policy"].retrain_cron == dg.EnvVar("RECSYS_RETRAIN_CRON")
    assert loaded.resources["canary_policy"].steps == [0.1, 0.3]
    drift = loaded.resolve_assets_def("drift_report")
    assert "*/5 * * * *" in str(drift.automation_conditions_by_key[dg.AssetKey("drift_report")])
    job = loaded.resolve_job_def("retrain")
    assert job.run_config["ops"]["two_tower_model"]["config"]["max_epochs"] == 3


def test_no_definitions_module_reads_settings_at_import() -> None:
    """load_settings() appears in the code location only inside functions (run when the definitions load)."""
    import ast

    offenders = []
    for path in (REPO_ROOT / "recsys_assets").rglob("*.py"):
        tree = ast.parse(path.read_text())
        inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}  # fmt: skip
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
                    == "load_settings" and id(node) not in inside):  # fmt: skip
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert offenders == []


def test_dagster_validates_the_workspace(recsys_env) -> None:
    result = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate", "-w", str(REPO_ROOT / "workspace.yaml")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_workspace_points_at_the_code_location() -> None:
    text = (REPO_ROOT / "workspace.yaml").read_text()
    assert "module_name: recsys_assets.definitions" in text
    assert Path(REPO_ROOT / "recsys_assets" / "definitions.py").exists()


@pytest.mark.parametrize("selection", ["no_such_asset", "tag:nothing=here"])
def test_materialize_exits_non_zero_on_an_empty_selection(recsys_env, selection: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "recsys_cli.cli", "materialize", selection],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "matches no materializable asset" in result.stderr


def test_materialize_prepares_every_landed_partition_then_the_rest(recsys_env) -> None:
    """`recsys materialize` on the data: the landed batches become partitions, each is extracted and cleaned
    once, then the features; a second call finds every partition done and runs only the rest again."""
    from datetime import UTC, datetime

    from recsys_core.warehouse import Warehouse
    from recsys_sim.simulation import simulate_history

    simulate_history(Warehouse(recsys_env.warehouse_uri), recsys_env.home, users=40, tracks=150, days=14, seed=4,
                     end=datetime(2026, 2, 1, tzinfo=UTC))  # fmt: skip
    selection = "key:listening_events or key:clean_listening_events or key:track_features"

    def materialize() -> list[str]:
        done = subprocess.run([sys.executable, "-m", "recsys_cli.cli", "materialize", selection],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return [line for line in done.stdout.splitlines() if line.startswith("run ")]

    assert len(materialize()) == 2  # one partition (the history is one range), then the features
    assert len(materialize()) == 1  # the partition is done: the features only
    clean = list((recsys_env.prepared_dir / "clean_listening_events").glob("batches-*.parquet"))
    assert [p.name for p in clean] == ["batches-0000000001-0000000001.parquet"]
    assert (recsys_env.prepared_dir / "track_features.parquet").exists()
