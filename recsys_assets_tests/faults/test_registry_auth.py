"""The registry behind MLflow's basic-auth app (issue "Nothing acknowledged is lost…", item 5): an
unauthenticated alias move is refused, the platform's own moves work with its credentials, and a move
that the platform did not make is detected and recorded. A real `mlflow server --app-name basic-auth`
on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from recsys_assets_tests.service.versions import tiny_version
from recsys_cli.stack.services import venv_bin
from recsys_cli.stack.supervisor import ServiceSpec, Stack, free_port
from recsys_core.control import ControlPlane
from recsys_core.registry import CHAMPION, MODEL_NAME
from recsys_core.settings import load_settings

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]
PASSWORD = "a-long-test-password-1234"
ALIAS_API = "/api/2.0/mlflow/registered-models/alias"


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def auth_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = tmp_path / "basic_auth.ini"
    config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path / 'auth.db'}\n"
                      "admin_username = admin\n")  # fmt: skip
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [venv_bin("mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination", str(tmp_path / "artifacts"), "--serve-artifacts"]  # fmt: skip
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-test-csrf-key"}  # fmt: skip
    stack = Stack(tmp_path / "run", env, cwd=tmp_path)
    stack.start([ServiceSpec("mlflow-auth", argv, port=port, ready=lambda: _healthy(url))], timeout=180)
    # The platform's credentials, read through its settings (and by MLflow's client).
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    try:
        yield url
    finally:
        stack.stop(grace=10)


def register(plane: ControlPlane, directory: Path, name: str) -> int:
    run_id = plane.start_run(name, tags={})
    uri = plane.log_model(run_id, directory)
    plane.end_run(run_id)
    return plane.register(model_uri=uri, run_id=run_id, lineage={}, reason=name, by="test").version


def test_unauthenticated_moves_are_refused_and_foreign_moves_recorded(auth_server: str, tmp_path: Path) -> None:
    assert load_settings().mlflow_credentials == ("admin", PASSWORD)
    plane = ControlPlane(auth_server, None, tmp_path / "cache")
    assert [register(plane, tiny_version(tmp_path / n, seed=i), n) for i, n in enumerate(("one", "two"))] == [1, 2]

    move = {"name": MODEL_NAME, "alias": CHAMPION, "version": "2"}
    anonymous = httpx.post(f"{auth_server}{ALIAS_API}", json=move, timeout=10)
    assert anonymous.status_code == 401
    assert (
        httpx.get(
            f"{auth_server}/api/2.0/mlflow/registered-models/get", params={"name": MODEL_NAME}, timeout=10
        ).status_code
        == 401
    )  # fmt: skip  (reads need credentials too)
    assert plane.by_alias(CHAMPION).version == 1
    assert plane.audit_aliases(settle_seconds=0) == []

    # Somebody with the store's credentials moves the champion by hand: detected, recorded, once.
    by_hand = httpx.post(f"{auth_server}{ALIAS_API}", json=move, auth=("admin", PASSWORD), timeout=10)
    assert by_hand.status_code == 200, by_hand.text
    found = plane.audit_aliases(settle_seconds=0)
    assert [(e["action"], e["from"], e["to"], e["by"]) for e in found] == [
        ("champion moved outside the platform", 1, 2, "unknown")
    ]
    assert plane.get(2).history[-1]["action"] == "champion moved outside the platform"
    assert plane.audit_aliases(settle_seconds=0) == []

    # The platform's own moves still work, and are its own.
    assert plane.rollback(to=1, reason="undo the hand move", by="test").version == 1
    assert plane.audit_aliases(settle_seconds=0) == []


def test_half_a_credential_is_refused_naming_the_missing_variable() -> None:
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_PASSWORD is not set"):
        load_settings({"MLFLOW_TRACKING_USERNAME": "admin"})
