"""Two workers: `kill -9` of one under load is not an outage (issue "Nothing acknowledged is lost…",
item 2). Real `bentoml serve`; the figures go to docs/reliability.md."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from recsys_assets_tests.conftest import REPO_ROOT
from recsys_assets_tests.service.test_replicas import until
from recsys_cli.stack.services import bento_spec
from recsys_cli.stack.supervisor import Stack, free_port
from recsys_core.settings import load_settings

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]
CLIENTS = 4


def workers_of(leader: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process(leader).children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and "_bentoml_impl.worker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:  # gone meanwhile
            continue
    return found


def like_reaches_every_worker(url: str) -> float:
    """A brand-new listener likes a track through one worker; seconds until every answer, whichever
    worker gives it (a new connection each: the kernel picks the worker), is personalised from it."""
    assert httpx.post(f"{url}/feedback", json={"user_id": "new-listener", "track_id": "t1", "event_type": "like"},
                      timeout=5).status_code == 202  # fmt: skip

    def every_answer_personalised() -> bool:
        answers = [httpx.post(f"{url}/recommend", json={"user_id": "new-listener", "k": 5}, timeout=5)
                   for _ in range(16)]  # fmt: skip
        # A worker that is still loading its model answers 503 (not ready): not yet, rather than a KeyError.
        return all(a.status_code == 200 and a.json()["personalised_from_history"] for a in answers)

    return until(every_answer_personalised, 10, "both workers to follow the like")


def test_killing_one_of_two_workers_under_load_fails_only_its_requests_in_flight(serving_home, tmp_path: Path):
    home = tmp_path / "home"  # a copy: its own warehouse and feedback log
    shutil.copytree(serving_home.home, home, ignore=shutil.ignore_patterns("warehouse.duckdb*", "serving"))
    settings = load_settings({"RECSYS_HOME": str(home)})
    port = free_port()
    spec = bento_spec(dataclasses.replace(settings, ports={**settings.ports, "bento": port}))
    # The warehouse poll once, at the start: what the workers share below, they share by their logs.
    stack = Stack(tmp_path / "run", cwd=REPO_ROOT, env={**serving_home.env, **settings.child_env({}),
                                                         "RECSYS_SERVING_WORKERS": "2",
                                                         "RECSYS_HISTORY_POLL_SECONDS": "3600"})  # fmt: skip
    stack.start([spec], timeout=180)
    url = f"http://127.0.0.1:{port}"
    outcomes: list[tuple[float, bool]] = []  # (when, answered 200)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def load(worker: int) -> None:
        with httpx.Client(base_url=url, timeout=5) as client:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    answer = client.post("/recommend", json={"user_id": f"u{1 + (i + worker) % 100}", "k": 5})
                    ok = answer.status_code == 200
                except httpx.HTTPError:
                    ok = False
                outcomes.append((time.monotonic(), ok))
                if not ok:
                    # A client retries after a pause, not in a tight loop. While the dead worker's process
                    # is torn down (≈ 0.2 s) its listening socket can still take connections and reset
                    # them: a client reconnecting at once failed about 30 times in that moment (118
                    # failures over 0.196 s, once on a fresh machine), which says no more than its one
                    # lost request.
                    time.sleep(0.3)

    try:
        until(lambda: len(workers_of(stack.records[0].pid)) == 2, 60, "two workers")
        followed = like_reaches_every_worker(url)
        threads.extend(threading.Thread(target=load, args=(n,)) for n in range(CLIENTS))
        for thread in threads:
            thread.start()
        until(lambda: len(outcomes) > 200, 30, "the load to start")
        victim = workers_of(stack.records[0].pid)[0]
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        until(lambda: time.monotonic() - killed_at > 3 and sum(ok for t, ok in outcomes if t > killed_at) > 100,
              60, "requests after the kill")  # fmt: skip
        ready = httpx.get(f"{url}/readyz", timeout=5).status_code
        respawned = until(lambda: len(workers_of(stack.records[0].pid)) == 2, 90, "the arbiter to respawn it")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        stack.stop(grace=20)
    failed = [t for t, ok in outcomes if not ok]
    window = (max(failed) - min(failed)) if failed else 0.0
    print(
        f"\n{len(outcomes)} requests, {len(failed)} failed over {window:.3f} s; /readyz {ready} right after; "
        f"worker back after {respawned:.1f} s; a like followed by both workers after {followed:.2f} s"
    )
    assert ready == 200  # the other worker answers
    assert len(failed) <= CLIENTS  # at most the requests the dead worker held
    assert window <= 1.0
