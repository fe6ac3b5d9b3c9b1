"""A full disk under the write-ahead log degrades the service, it does not fail it (issue "Durability past
one process", item 1). Real `bentoml serve` with its log on a real filesystem that fills up: a tmpfs of
a few hundred KB mounted under the log (root mounts it; the machine's kind allows it)."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from recsys_assets_tests.conftest import REPO_ROOT
from recsys_assets_tests.service.test_replicas import until
from recsys_assets_tests.service.test_wal import landed_ids
from recsys_cli.stack.services import bento_spec
from recsys_cli.stack.supervisor import Stack, free_port
from recsys_core.settings import load_settings
from recsys_core.warehouse import Warehouse

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]


@pytest.fixture
def small_filesystem(tmp_path: Path):
    """A 512 KB tmpfs at a fresh directory, unmounted afterwards."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        pytest.fail(f"this test mounts a tmpfs (as root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """Fill ``directory``'s filesystem to the last block; the filler file is returned (delete it to free)."""
    filler = directory / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True, check=False)  # ENOSPC ends it
    assert shutil.disk_usage(directory).free == 0
    return filler


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))  # fmt: skip


def test_a_full_log_disk_drops_impressions_refuses_feedback_with_503_and_recovers(
    serving_home, tmp_path: Path, small_filesystem: Path
) -> None:
    home = tmp_path / "home"
    shutil.copytree(serving_home.home, home, ignore=shutil.ignore_patterns("warehouse.duckdb*", "serving"))
    settings = load_settings({"RECSYS_HOME": str(home), "RECSYS_BENTO_PORT": str(free_port()),
                              "RECSYS_FEEDBACK_LOG_DIR": str(small_filesystem)})  # the log's own volume  # fmt: skip
    env = {**serving_home.env, **settings.child_env({}), "RECSYS_SERVING_WORKERS": "1",
           "RECSYS_FEEDBACK_FLUSH_SECONDS": "0.5", "RECSYS_FEEDBACK_LOG_DIR": str(small_filesystem)}  # fmt: skip
    stack = Stack(tmp_path / "run", env=env, cwd=REPO_ROOT)
    stack.start([bento_spec(settings)], timeout=180)
    url = settings.url("bento")
    warehouse = Warehouse(settings.warehouse_uri)
    acknowledged, refused, statuses = [], [], []

    def feedback(prefix: str) -> httpx.Response:
        event_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
        answer = httpx.post(f"{url}/feedback", json={"user_id": "u1", "track_id": "t1", "event_type": "click",
                                                     "event_id": event_id}, timeout=10)  # fmt: skip
        statuses.append(answer.status_code)
        (acknowledged if answer.status_code == 202 else refused).append(event_id)
        return answer

    try:
        for _ in range(5):
            assert feedback("disk").status_code == 202
        until(lambda: len(landed_ids(warehouse, "disk")) == 5, 30, "the first events to land")
        until(lambda: metric(url, "recsys_feedback_backlog_events") == 0, 30, "the log to be landed")

        filler = fill(small_filesystem)
        lists = [httpx.post(f"{url}/recommend", json={"user_id": f"u{i % 50 + 1}", "k": 10}, timeout=10)
                 for i in range(30)]  # fmt: skip
        assert [r.status_code for r in lists] == [200] * 30  # the product first
        answers = [feedback("disk") for _ in range(20)]
        assert set(statuses) <= {202, 503}, statuses  # never a 500
        assert sum(a.status_code == 503 for a in answers) >= 15  # a segment's last page may take a few
        refusal = next(a for a in answers if a.status_code == 503)
        assert refusal.headers["Retry-After"] == "5"
        assert "No space left on device" in refusal.json()["error"]
        ready = httpx.get(f"{url}/readyz", timeout=5)
        assert ready.status_code == 200  # in rotation
        assert ready.text.startswith("degraded: the write-ahead log refuses writes (ENOSPC")
        assert ready.headers["x-recsys-degraded"] == "1"
        dropped = metric(url, "recsys_impressions_dropped_total")
        assert dropped >= 10 * 25
        assert metric(url, "recsys_feedback_refused_total") == len(refused)
        print(f"\nfull disk: 30 of 30 lists answered 200, {dropped:.0f} impressions dropped; "
              f"{sum(a.status_code == 503 for a in answers)} of 20 feedback calls answered 503")  # fmt: skip

        filler.unlink()  # space is back: no restart
        until(lambda: feedback("disk").status_code == 202, 10, "feedback to be acknowledged again")
        httpx.post(f"{url}/recommend", json={"user_id": "u1", "k": 10}, timeout=10)
        ready = httpx.get(f"{url}/readyz", timeout=5)
        assert ready.status_code == 200
        assert "degraded" not in ready.text
        assert "x-recsys-degraded" not in ready.headers
        until(lambda: landed_ids(warehouse, "disk") >= set(acknowledged), 30, "what was acknowledged to land")
        assert landed_ids(warehouse, "disk") == set(acknowledged)  # nothing refused landed
        count = warehouse.scalar("SELECT COUNT(*) FROM listening_events WHERE event_id LIKE 'disk-%'")
        assert count == len(acknowledged)  # once each
        assert not list((small_filesystem / "quarantine").glob("*"))
    finally:
        stack.stop(grace=20)
