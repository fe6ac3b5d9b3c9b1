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

    return defs


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
    assert {"batch_conservation", "clean_events_schema", "clean_events_nulls_and_duplicates"} <= names
    from recsys_assets.checks import batch_conservation

    (spec,) = batch_conservation.check_specs
    assert spec.asset_key == dg.AssetKey("clean_listening_events")
    assert spec.blocking


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
