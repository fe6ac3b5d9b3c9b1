"""Benchmark: from the 20% threshold being crossed to the new model serving as challenger.

    .venv/bin/python benchmarks/loop.py [--users 5000 --tracks 20000 --days 27]   # ~1 million events

1. ``recsys up`` in a throw-away ``RECSYS_HOME`` (Dagster webserver and daemon with their default sensor
   cadence, MLflow, ``bentoml serve``), a simulated history of about a million events, and the first
   model (the ``retrain_sensor``'s bootstrap retrain) serving as champion.
2. At T0 one batch of new events lands that takes the new positives just past 20% of the champion's
   training rows.
3. The daemon does the rest; the benchmark waits until the service answers with a challenger, and
   reads the retrain run's event log to split the time into: sensor wait (T0 → run created),
   queueing, process start (launch, imports, code loading), preparation (extract, clean, features),
   training, evaluation (and the gate), registration, deployment (Bento build, reload), and the swap
   (run end → the service answers with the challenger; zero when it answers before the run ends).
   Orchestration is the sum of the sensor wait, the queueing, the process start, the gaps between
   steps and the swap.

The gate is set permissive (``min_improvement: -1``) so that the candidate always reaches the canary:
what is measured is the loop's latency, not the gate's judgement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

import recsys_assets  # noqa: F401  (environment first)

REPO = Path(__file__).resolve().parents[1]
PREPARATION = ("listening_events", "clean_listening_events", "track_features", "training_interactions")
OWN_VARIABLES = ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "PROMETHEUS_URL", "BENTOML_HOME")
PERMISSIVE_GATE = {"min_improvement": -1.0, "guards": {"recall@10": 1.0, "coverage@10": 1.0}}
STAGES = {
    "preparation": PREPARATION,
    "training": ("two_tower_model",),
    "evaluation": ("model_evaluation", "model_evaluation_promotion_gate"),
    "registration": ("registered_model",),
    "deployment": ("recommender_bento", "model_deployment"),
}


def wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")


def served_challenger(url: str) -> int | None:
    token = os.environ.get("RECSYS_ADMIN_TOKEN", "")
    try:
        body = httpx.post(
            f"{url}/admin/canary", json={}, headers={"Authorization": f"Bearer {token}"}, timeout=5
        ).json()
    except (httpx.HTTPError, ValueError):
        return None
    return body.get("challenger_version")


def step_times(instance, run_id: str) -> tuple[dict[str, float], dict[str, float]]:
    """(run-level event times, per-step durations) from the run's event log."""
    import dagster as dg

    marks: dict[str, float] = {}
    starts: dict[str, float] = {}
    durations: dict[str, float] = {}
    for record in instance.all_logs(run_id):
        if not record.is_dagster_event:
            continue
        kind = record.dagster_event.event_type
        step = record.step_key
        if kind == dg.DagsterEventType.RUN_STARTING:
            marks["starting"] = record.timestamp
        elif kind == dg.DagsterEventType.RUN_START:
            marks["started"] = record.timestamp
        elif kind in (dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE):
            marks["finished"] = record.timestamp
        elif kind == dg.DagsterEventType.STEP_START:
            starts[step] = record.timestamp
        elif kind in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE) and step in starts:
            durations[step] = record.timestamp - starts[step]
    return marks, durations


def new_positive_events(warehouse, since: datetime) -> int:
    """Plays and likes landed in the warehouse after ``since`` (what will be training positives once prepared)."""
    return int(
        warehouse.scalar(
            "SELECT COUNT(*) FROM listening_events WHERE played_at > ? AND event_type IN ('play', 'like')", [since]
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--tracks", type=int, default=20000)
    parser.add_argument("--days", type=int, default=27)
    parser.add_argument("--keep", help="keep RECSYS_HOME in this directory")
    args = parser.parse_args()

    from recsys_cli.stack.supervisor import free_port
    from recsys_core.registry import CHAMPION, Registry
    from recsys_core.settings import load_settings
    from recsys_core.warehouse import Warehouse
    from recsys_sim.simulation import simulate_history, stream_tick, world_dir
    from recsys_sim.simulator import World

    home = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="recsys-loop-"))
    ports = {name: free_port() for name in ("dagster", "mlflow", "bento", "prometheus")}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RECSYS_") and k not in OWN_VARIABLES},
        "RECSYS_HOME": str(home),
        **{f"RECSYS_{name.upper()}_PORT": str(port) for name, port in ports.items()},
        "RECSYS_ADMIN_TOKEN": "loop-benchmark",
        "RECSYS_RETRAIN_RUN_CONFIG": json.dumps({"ops": {"model_evaluation": {"config": PERMISSIVE_GATE}}}),
    }  # fmt: skip
    os.environ.update({k: v for k, v in env.items() if k.startswith("RECSYS_")})
    settings = load_settings(env)
    os.environ["DAGSTER_HOME"] = str(settings.dagster_home)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "recsys"), "up", "--no-prometheus"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    try:
        wait_for(lambda: any("Ctrl-C stops everything" in line for line in lines), 300, "the stack")
        warehouse = Warehouse(settings.warehouse_uri)
        t = time.perf_counter()
        report = simulate_history(warehouse, home, users=args.users, tracks=args.tracks, days=args.days, seed=7)
        print(f"history: {report.events:,} events in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        registry = Registry(settings.mlflow_tracking_uri, settings.mlflow_artifacts_dir, home / "cache")
        t = time.perf_counter()
        champion = wait_for(lambda: registry.by_alias(CHAMPION), 1800, "the bootstrap champion", poll=5)
        print(f"bootstrap champion v{champion.version} after {time.perf_counter() - t:.0f}s", file=sys.stderr)

        trained = int(champion.lineage("train_interactions"))
        since = datetime.fromisoformat(champion.lineage("max_played_at"))
        needed = int(0.2 * trained) - new_positive_events(warehouse, since) + 1
        world = World.load(world_dir(home))
        # Positives are ~85% of simulated events: land enough events to take them just past 20%.
        batch_events = int(needed / 0.8)
        now = datetime.now(UTC)
        t0 = time.time()
        landed = stream_tick(warehouse, world, start=now, end=now, events=batch_events)
        world.save(world_dir(home))
        crossed = new_positive_events(warehouse, since) / trained
        print(f"T0: landed {landed.landed:,} events: new positives at {crossed:.1%} of {trained:,}", file=sys.stderr)

        challenger = wait_for(
            lambda: served_challenger(settings.serving_url), 1800, "the challenger being served", poll=0.5
        )
        t_end = time.time()
        import dagster as dg

        with dg.DagsterInstance.get() as instance:
            runs = instance.get_runs(filters=dg.RunsFilter(tags={"recsys/trigger": "new-data"}), limit=1)
            run = runs[0]
            created = instance.get_run_record_by_id(run.run_id).create_timestamp.timestamp()
            # The service serves the challenger from the deployment step on, a moment before the run ends.
            wait_for(lambda: instance.get_run_by_id(run.run_id).is_finished, 120, "the retrain run to end")
            marks, durations = step_times(instance, run.run_id)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=180)

    stages = {stage: sum(durations.get(step, 0.0) for step in steps) for stage, steps in STAGES.items()}
    breakdown = {
        "sensor_wait": created - t0,
        "queueing": marks["starting"] - created,
        "process_start": marks["started"] - marks["starting"],
        **stages,
        # Up to the moment the challenger answers: a run that ends after it costs the loop nothing more.
        "gaps_between_steps": (min(marks["finished"], t_end) - marks["started"]) - sum(durations.values()),
        "swap": max(0.0, t_end - marks["finished"]),
    }
    total = t_end - t0
    orchestration = sum(
        breakdown[k] for k in ("sensor_wait", "queueing", "process_start", "gaps_between_steps", "swap")
    )
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "history_events": report.events,
        "champion_training_rows": trained,
        "challenger_version": challenger,
        "total_seconds": total,
        "orchestration_seconds": orchestration,
        "orchestration_share": orchestration / total,
        "breakdown_seconds": breakdown,
        "steps_seconds": durations,
    }
    for key, value in breakdown.items():
        print(f"  {key:<20} {value:8.1f} s", file=sys.stderr)
    print(f"total {total:.1f} s, orchestration {orchestration:.1f} s ({orchestration / total:.0%})", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
