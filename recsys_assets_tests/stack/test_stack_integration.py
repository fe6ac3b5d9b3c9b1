"""`recsys up` starts the real Dagster webserver, daemon and MLflow server, and Ctrl-C stops them all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import httpx
import psutil
import pytest

from recsys_assets_tests.conftest import BIN
from recsys_assets_tests.test_definitions import EXPECTED_ASSETS
from recsys_cli.stack.supervisor import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAEMONS_QUERY = "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }"
ASSETS_QUERY = "{ assetNodes { assetKey { path } } }"


def _graphql(url: str, query: str) -> dict:
    response = httpx.post(f"{url}/graphql", json={"query": query}, timeout=10)
    response.raise_for_status()
    return response.json()["data"]


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, output: list[str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"recsys up exited ({proc.returncode}) before {what}:\n{''.join(output)}")
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_recsys_up_serves_the_uis_and_ctrl_c_leaves_no_orphans(recsys_env) -> None:
    ports = {name: free_port() for name in ("dagster", "mlflow", "bento", "prometheus")}
    dagster_url = f"http://127.0.0.1:{ports['dagster']}"
    mlflow_url = f"http://127.0.0.1:{ports['mlflow']}"
    proc = subprocess.Popen(
        [
            str(BIN / "recsys"),
            "up",
            "--no-prometheus",
            *[f"--{name}-port={port}" for name, port in ports.items()],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    state_file = recsys_env.run_dir / "stack.json"
    try:
        # `recsys up` is up when it has printed its URLs and waits for Ctrl-C.
        _wait_for(lambda: any("Ctrl-C stops everything" in line for line in output), 240, "the URLs", proc, output)
        assert any(f"{dagster_url}" in line for line in output)
        assert any(f"{mlflow_url}" in line for line in output)

        def server_info() -> bool:
            try:
                return httpx.get(f"{dagster_url}/server_info", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(server_info, 10, "/server_info", proc, output)

        def daemons_healthy() -> bool:
            statuses = _graphql(dagster_url, DAEMONS_QUERY)["instance"]["daemonHealth"]["allDaemonStatuses"]
            return bool(statuses) and all(s["healthy"] for s in statuses if s["required"])

        _wait_for(daemons_healthy, 10, "healthy daemons", proc, output)
        statuses = _graphql(dagster_url, DAEMONS_QUERY)["instance"]["daemonHealth"]["allDaemonStatuses"]
        required = {s["daemonType"] for s in statuses if s["required"]}
        assert {"SENSOR", "SCHEDULER", "QUEUED_RUN_COORDINATOR"} <= required

        catalogue = {"/".join(n["assetKey"]["path"]) for n in _graphql(dagster_url, ASSETS_QUERY)["assetNodes"]}
        assert catalogue >= EXPECTED_ASSETS

        def mlflow_ui() -> bool:
            try:
                return httpx.get(f"{mlflow_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(mlflow_ui, 10, "the MLflow server", proc, output)
        page = httpx.get(mlflow_url, timeout=10)
        assert page.status_code == 200
        assert "<title>MLflow</title>" in page.text

        records = json.loads(state_file.read_text())
        assert {r["name"] for r in records} == {"dagster-webserver", "dagster-daemon", "mlflow", "bento"}
        assert httpx.get(f"http://127.0.0.1:{ports['bento']}/readyz", timeout=5).status_code == 200
        started = {r["pid"] for r in records}
        for record in records:
            started |= {c.pid for c in psutil.Process(record["pid"]).children(recursive=True)}
        assert len(started) > 3  # the code servers and web workers are children

        # A crash of one service: `recsys up` restarts it (and says so); the others are untouched.
        mlflow_pid = next(r["pid"] for r in records if r["name"] == "mlflow")
        os.killpg(mlflow_pid, signal.SIGKILL)
        _wait_for(lambda: not mlflow_ui(), 10, "the MLflow server to die", proc, output)
        _wait_for(mlflow_ui, 60, "the MLflow server to be restarted", proc, output)
        assert any(line.startswith(f"mlflow (pid {mlflow_pid}) ") for line in output)
        assert any(line.startswith("mlflow restarted (pid ") for line in output)
        restarted = next(r for r in json.loads(state_file.read_text()) if r["name"] == "mlflow")
        assert restarted["restarts_total"] == 1
        started |= {restarted["pid"]} | {c.pid for c in psutil.Process(restarted["pid"]).children(recursive=True)}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
        reader.join(timeout=10)

    text = "".join(output)
    assert proc.returncode == 0, text
    assert "stopped bento, mlflow, dagster-daemon, dagster-webserver" in text
    alive = [p for p in started if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    assert not state_file.exists()
