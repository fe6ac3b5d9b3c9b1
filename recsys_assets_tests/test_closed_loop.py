"""The closed loop with the real daemon, sized for CI: nothing here tells the platform what to do.

The test plays the world (a simulated history, new events, simulated users, a bad model someone
registers by mistake, a drift of tastes, a metric that trips a Prometheus alert) and watches the
platform react by itself: bootstrap, canary rollback, retrain on new data, canary promotion, retrain on
drift, retrain on an alert. It starts `recsys up` (Dagster webserver and daemon, MLflow, `bentoml serve`,
Prometheus from the Debian package) on free ports and stops everything at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import httpx
import numpy as np
import psutil
import pytest

from recsys_assets.runs import RUN_KEY_TAG
from recsys_assets_tests.conftest import BIN
from recsys_cli.demo import StreamDriver, TrafficDriver
from recsys_cli.stack.supervisor import free_port
from recsys_core.control import ControlPlane
from recsys_core.model_version import ModelArtifact
from recsys_core.registry import CHALLENGER, CHAMPION, Registry
from recsys_core.settings import load_settings
from recsys_core.warehouse import Warehouse
from recsys_sim.simulation import simulate_history, world_dir
from recsys_sim.simulator import Drift, World

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SETTINGS_VARIABLES = ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "PROMETHEUS_URL", "BENTOML_HOME")
TEST_RULES = """
groups:
  - name: recsys-test
    rules:
      - alert: RecsysTestKPIAlert
        expr: sum(recsys_feedback_total{variant="unknown", event_type="dislike"}) > 0
        labels: { severity: warning, retrain: "true" }
        annotations: { summary: "a test alert that asks for a retrain" }
"""


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"recsys up exited ({proc.returncode}) while waiting for {what}")
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def retrain_runs(instance: dg.DagsterInstance, trigger: str, after: datetime | None = None) -> list[dg.DagsterRun]:
    tags = {"recsys/retrain": "true", "recsys/trigger": trigger}
    return instance.get_runs(filters=dg.RunsFilter(tags=tags, created_after=after))


def drift_retrains(instance: dg.DagsterInstance, after: datetime) -> list[dg.DagsterRun]:
    """Retrains on a drift report computed after ``after`` (the small simulated world can also drift
    by chance before it: a retrain on such an earlier report proves nothing about the injected drift)."""
    reports = instance.fetch_materializations(dg.AssetKey("drift_report"), limit=500, ascending=False).records
    computed_after = {r.storage_id for r in reports if r.timestamp >= after.timestamp()}
    return [
        run for run in retrain_runs(instance, "drift", after)
        if run.tags[RUN_KEY_TAG] in {f"drift:{report}" for report in computed_after}
    ]  # fmt: skip


def taste_version(registry: Registry, source: int, directory: Path, world: World, sign: float) -> Path:
    """Version ``source``'s files with the simulator's true tastes as embeddings.

    ``sign=1`` ranks each user's best liked tracks first (good whatever the champion), ``sign=-1``
    the least liked (a model that loads and serves, and that no simulated user wants to click).
    """
    shutil.copytree(registry.download(source), directory)
    artifact = ModelArtifact.load(directory)
    tracks = {t: i for i, t in enumerate(World.track_id(np.arange(world.n_tracks)))}
    users = {u: i for i, u in enumerate(World.user_id(np.arange(world.n_users)))}
    item_rows = [tracks[t] for t in artifact.item_ids[1:]]
    user_rows = [users[u] for u in artifact.user_ids[1:]]
    dim = world.a["track_vec"].shape[1]
    items = np.vstack([np.zeros((1, dim)), world.a["track_vec"][item_rows]]).astype(np.float32)
    tastes = np.vstack([np.zeros((1, dim)), sign * world.a["user_vec"][user_rows]]).astype(np.float32)
    np.save(directory / "item_embeddings.npy", items)
    np.save(directory / "user_embeddings.npy", tastes)
    # A static version: the users are their true tastes, not a query tower's output over their plays.
    for history_file in ("query_tower.npz", "user_history.npy"):
        (directory / history_file).unlink(missing_ok=True)
    return directory


def test_the_loop_reacts_by_itself(tmp_path: Path, prep_engine: str) -> None:
    ports = {name: free_port() for name in ("dagster", "mlflow", "bento", "prometheus")}
    rules = tmp_path / "test_rules.yml"
    rules.write_text(TEST_RULES)
    retrain_config = {
        "ops": {
            # The default training (a few seconds on this data): a weak first model would make the
            # canary's verdicts about the retrained ones a coin toss.
            # The gate is tested on its own; here any candidate that is not far worse goes to the canary.
            "model_evaluation": {"config": {"min_improvement": -0.5, "guards": {"recall@10": 1.0, "coverage@10": 1.0}}},
        }
    }
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RECSYS_") and k not in SETTINGS_VARIABLES},
        "RECSYS_HOME": str(tmp_path / "home"),
        **{f"RECSYS_{name.upper()}_PORT": str(port) for name, port in ports.items()},
        "RECSYS_SENSOR_INTERVAL_SECONDS": "5",
        "RECSYS_EXTRACT_MIN_INTERVAL_SECONDS": "30",
        "RECSYS_CANARY_STEPS": "0.2,0.5",
        "RECSYS_CANARY_MIN_IMPRESSIONS": "400",
        "RECSYS_CANARY_MAX_IMPRESSIONS": "2000",
        "RECSYS_DRIFT_CRON": "* * * * *",
        "RECSYS_DRIFT_WINDOW_DAYS": "0.003",
        # The product's default. At 0.4, 2 of 5 columns drifting by chance in this small world started a
        # drift retrain after every canary decision (decisions take about a minute now), and drift goes
        # before new data: the new-data retrain of step 3 never came.
        "RECSYS_DRIFT_SHARE": "0.5",
        "RECSYS_RETRAIN_BACKOFF_SECONDS": "20",
        "RECSYS_RETRAIN_CRASH_BACKOFF_SECONDS": "20",
        "RECSYS_MODEL_POLL_SECONDS": "2",
        # One serving worker here: this test shares 2 cores among the whole stack and its simulated
        # users (two workers, and a killed one, are service/test_workers.py's).
        "RECSYS_SERVING_WORKERS": "1",
        "RECSYS_RETRAIN_RUN_CONFIG": json.dumps(retrain_config),
        # Every retrain searches its hyperparameters first (the default's budget, set here so that a
        # change of the default does not change the test's time): the retrains after the first start
        # from the champion's values.
        "RECSYS_TUNING_BUDGET_SECONDS": "10",
        "RECSYS_PROMETHEUS_EXTRA_RULES": str(rules),
        # `pytest --prep-engine spark`: the same loop with the preparation on Spark (local, through Pipes).
        "RECSYS_PREP_ENGINE": prep_engine,
        "RECSYS_SPARK_CONF": "spark.driver.memory=1g spark.sql.shuffle.partitions=4 spark.ui.enabled=false "
        "spark.driver.host=127.0.0.1",
    }  # fmt: skip
    assert shutil.which("prometheus"), "prometheus is missing: `make test` installs it (scripts/test-setup.sh)"
    os.environ.update({k: env[k] for k in env if k.startswith("RECSYS_")})
    settings = load_settings(env)
    proc = subprocess.Popen(
        [str(BIN / "recsys"), "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    stream = traffic = None
    started: set[int] = set()
    try:
        wait_for(lambda: any("Ctrl-C stops everything" in line for line in output), 300, "the stack", proc)
        records = json.loads((settings.run_dir / "stack.json").read_text())
        assert {r["name"] for r in records} >= {"dagster-daemon", "bento", "prometheus"}
        started = {r["pid"] for r in records}

        warehouse = Warehouse(settings.warehouse_uri)
        end = datetime.now(UTC).replace(microsecond=0)
        simulate_history(warehouse, settings.home, users=150, tracks=500, days=10, seed=3, end=end)
        registry = ControlPlane(settings.mlflow_tracking_uri, settings.mlflow_artifacts_dir, tmp_path / "cache")
        os.environ["DAGSTER_HOME"] = str(settings.dagster_home)

        # 1. No champion: the platform trains and serves its first model by itself.
        wait_for(lambda: registry.by_alias(CHAMPION), 420, "the bootstrap champion", proc)
        assert registry.by_alias(CHAMPION).version == 1
        wait_for(lambda: _served_version(settings) == 1, 60, "the service to serve v1", proc)

        traffic = TrafficDriver(settings.serving_url, settings.home, rps=15, users=150, chunk_seconds=10)
        traffic.start()
        stream = StreamDriver(warehouse, settings.home, rate=60, interval=2)
        stream.start()

        # 2. A bad model registered by mistake is canaried and rolled back by the online metrics.
        run_id = registry.start_run("bad-by-mistake", tags={})
        world = World.load(world_dir(settings.home))
        uri = registry.log_model(run_id, taste_version(registry, 1, tmp_path / "bad", world, sign=-1.0))
        bad = registry.register(model_uri=uri, run_id=run_id, lineage={}, reason="registered by mistake", by="test")
        assert registry.by_alias(CHALLENGER).version == bad.version
        wait_for(lambda: registry.get(bad.version).status == "rolled_back", 300, "the bad challenger's rollback", proc)
        assert registry.by_alias(CHAMPION).version == 1
        assert registry.get(bad.version).history[-1]["by"].startswith("canary_analysis")

        # 3. New events reach 20%: a retrain, a challenger, a canary decision made online. Whether the
        # retrained model wins depends on the simulated users; either verdict is the platform's own.
        with dg.DagsterInstance.get() as instance:
            wait_for(lambda: retrain_runs(instance, "new-data"), 300, "a retrain on new data", proc)

        def decided_retrain() -> int | None:
            for version in registry.versions():
                if version.version > bad.version and version.status in ("champion", "retired", "rolled_back"):
                    return version.version
            return None

        retrained = wait_for(decided_retrain, 600, "the canary's verdict on a retrained model", proc)
        assert registry.get(retrained).history[-1]["by"].startswith("canary_analysis")

        # A deliberately good challenger (the simulator's true tastes) is promoted by the canary.
        run_id = registry.start_run("good-by-design", tags={})
        uri = registry.log_model(run_id, taste_version(registry, retrained, tmp_path / "good", world, sign=1.0))
        lineage = registry.get(retrained).lineage_tags  # its data lineage: the sensors and the drift report read it
        for _ in range(3):
            registered = registry.register(
                model_uri=uri, run_id=run_id, lineage=lineage, reason="true tastes", by="test"
            )
            good = registered.version
            verdict = lambda v=good: registry.get(v).status in ("champion", "rolled_back", "superseded")  # noqa: E731
            wait_for(verdict, 300, "the good challenger's verdict", proc)
            if registry.get(good).status != "superseded":
                break
            # A retrain requested in the second between the last verdict and this registration ended
            # with a challenger of its own, which replaced ours (the newest candidate is canaried).
            # Register ours again once the canary has judged that one, as an operator would.
            wait_for(lambda: registry.by_alias(CHALLENGER) is None, 600, "the replacing challenger's verdict", proc)
        assert registry.get(good).status == "champion", registry.get(good).history
        assert registry.get(good).history[-1]["by"].startswith("canary_analysis")
        wait_for(lambda: _served_version(settings) == good, 60, f"the service to serve v{good}", proc)

        # 4. Tastes drift: the drift report catches it and a retrain follows.
        drifted_at = datetime.now(UTC)
        stream.start(Drift(taste_shift=0.9, new_genre=0.5))
        with dg.DagsterInstance.get() as instance:
            wait_for(lambda: drift_retrains(instance, drifted_at), 600, "a retrain on the injected drift", proc)

        # 5. A Prometheus alert labelled retrain="true" starts a retrain (once per episode).
        alerted_at = datetime.now(UTC)
        # Feedback without a variant: the simulated users always send one, so only this trips the test rule
        # (an unknown model_version would not do: the service labels any version it does not serve "other").
        httpx.post(f"{settings.serving_url}/feedback", json={"user_id": "u", "track_id": "t", "event_type": "dislike"}
                   ).raise_for_status()  # fmt: skip
        with dg.DagsterInstance.get() as instance:
            alert_retrains = lambda: retrain_runs(instance, "kpi-alert", alerted_at)  # noqa: E731
            runs = wait_for(alert_retrains, 600, "a retrain on the alert", proc)
            assert "RecsysTestKPIAlert" in runs[0].tags["recsys/reason"]
            failed = [r for r in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
                      if r.tags.get("recsys/retrain") != "true"]  # fmt: skip
            assert failed == [], [r.run_id for r in failed]  # only retrains may fail (a rejected candidate)
        assert traffic.reports
        assert sum(r.requests for r in traffic.reports) > 500
    except BaseException:
        _print_story(settings)  # what the platform did, for whoever reads a failed CI log
        raise
    finally:
        if traffic is not None:
            traffic.stop()
        if stream is not None:
            stream.stop()
        for record in (
            json.loads((settings.run_dir / "stack.json").read_text())
            if (settings.run_dir / "stack.json").exists()
            else []
        ):
            started |= {record["pid"], *map(int, record.get("children", {}))}
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=180)
        reader.join(timeout=10)
    alive = [p for p in started if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == []


def _print_story(settings) -> None:
    """The registry's history, the runs and the sensors' last word, on stdout (pytest shows it on failure)."""
    print("\n=== registry ===")
    try:
        registry = Registry(settings.mlflow_tracking_uri, settings.mlflow_artifacts_dir, settings.home / "story-cache")
        for version in sorted(registry.versions(), key=lambda v: v.version):
            print(f"v{version.version} {version.status}")
            for event in version.history:
                print(f"    {event['at'][11:19]} {event['action']}: {event['reason'][:160]} ({event['by'][:40]})")
    except Exception as exc:  # noqa: BLE001 (a report on the way out must not hide the failure)
        print(f"the registry cannot be read: {exc!r}")
    print("=== runs ===")
    os.environ["DAGSTER_HOME"] = str(settings.dagster_home)
    with dg.DagsterInstance.get() as instance:
        for run in reversed(instance.get_runs(limit=60)):
            stats = instance.get_run_stats(run.run_id)
            start = time.strftime("%H:%M:%S", time.gmtime(stats.start_time)) if stats.start_time else "-"
            took = f"{stats.end_time - stats.start_time:.0f}s" if stats.start_time and stats.end_time else "-"
            print(f"{run.run_id[:8]} {run.status.value:8} {start} {took:>5} trigger={run.tags.get('recsys/trigger')} "
                  f"reason={run.tags.get('recsys/reason', '')[:100]}")  # fmt: skip
        print("=== sensors ===")
        for state in instance.all_instigator_state():
            ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=1)
            if ticks:
                print(f"{state.name}: {ticks[0].status.value} {ticks[0].skip_reason or ''}")


def _served_version(settings) -> int | None:
    try:
        body = httpx.post(f"{settings.serving_url}/recommend", json={"user_id": "probe-user", "k": 1}, timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return None
    return body.get("model_version") if body.get("variant") == "champion" else None
