"""A training killed with SIGKILL leaves no MLflow run RUNNING for ever (issue "Nothing acknowledged is
lost…", item 6). Real MLflow store (SQLite), a real process killed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from recsys_core.control import ControlPlane

pytestmark = [pytest.mark.faults, pytest.mark.slow]

TRAINING = """
import os, signal, sys
from pathlib import Path
from recsys_core.control import ControlPlane
plane = ControlPlane(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
run_id = plane.start_run("doomed", tags={"dagster.run_id": sys.argv[4]})
print(run_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does in the middle of a training
"""


def test_the_run_of_a_killed_training_is_ended_as_failed_once_its_dagster_run_is_over(tmp_path: Path) -> None:
    plane = ControlPlane(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", tmp_path / "cache")
    args = [plane.tracking_uri, str(tmp_path / "artifacts"), str(tmp_path / "cache")]
    killed = subprocess.run([sys.executable, "-c", TRAINING, *args, "dagster-run-killed"], capture_output=True,
                            text=True, check=False)  # fmt: skip
    assert killed.returncode == -9
    orphan = killed.stdout.split()[0]
    alive = plane.start_run("still training", tags={"dagster.run_id": "dagster-run-alive"})
    client = plane.client()
    assert client.get_run(orphan).info.status == "RUNNING"

    closed = plane.fail_abandoned_runs(is_active=lambda dagster_run: dagster_run == "dagster-run-alive")

    assert closed == [orphan]
    assert client.get_run(orphan).info.status == "FAILED"
    assert "dagster-run-killed" in client.get_run(orphan).data.tags["recsys.ended_by"]
    assert client.get_run(alive).info.status == "RUNNING"  # its Dagster run goes on: left alone
    assert plane.fail_abandoned_runs(is_active=lambda _: False) == [alive]
