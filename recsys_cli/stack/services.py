"""The processes of the local stack, and the files they need under ``$RECSYS_HOME``."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import httpx

from recsys_cli.stack.supervisor import ServiceSpec
from recsys_core.settings import Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKSPACE_FILE = REPO_ROOT / "workspace.yaml"
ALERT_RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"

# Two cores: one run at a time keeps training from starving the webserver, the daemon and serving.
DAGSTER_YAML = """\
# Written by `recsys` when this RECSYS_HOME was created; edit freely, it is not overwritten.
telemetry:
  enabled: false
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    max_concurrent_runs: 1
    tag_concurrency_limits:
      - key: recsys/retrain
        limit: 1
# DefaultRunLauncher plus a health check, so that run monitoring fails a run whose process died.
run_launcher:
  module: recsys_cli.stack.run_launcher
  class: LocalRunLauncher
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  poll_interval_seconds: 30
# One sensor at a time: two cores, and the sensors' reads (the registry, the warehouse, the prepared
# partitions) need not compete with the runs.
sensors:
  use_threads: true
  num_workers: 1
schedules:
  use_threads: true
  num_workers: 1
"""


# RECSYS_DAGSTER_STORAGE_URI set: runs, event logs and schedules in PostgreSQL (dagster-postgres).
POSTGRES_STORAGE = """\
storage:
  postgres:
    postgres_url:
      env: RECSYS_DAGSTER_STORAGE_URI
"""


def ensure_home(settings: Settings) -> None:
    """Create ``$RECSYS_HOME`` and its ``dagster.yaml``; existing files are left as they are."""
    local = [settings.home, settings.dagster_home, settings.run_dir]
    if not settings.remote_storage:  # object storage has no directories to create
        local += [settings.prepared_dir, settings.mlflow_artifacts_dir, settings.reports_dir]
    for path in local:
        path.mkdir(parents=True, exist_ok=True)
    # The stores, logs and the admin token are the owner's alone: a private root keeps every file
    # under it out of other users' reach, whatever mode the libraries create them with.
    settings.home.chmod(0o700)
    dagster_yaml = settings.dagster_home / "dagster.yaml"
    if not dagster_yaml.exists():
        dagster_yaml.write_text(DAGSTER_YAML + (POSTGRES_STORAGE if settings.dagster_storage_uri else ""))


def init_dagster_storage(settings: Settings) -> None:
    """Create the Dagster instance's SQLite storage once, before several processes open it.

    The webserver and the daemon, started together on a new ``DAGSTER_HOME``, would both run the
    storage migrations and one of them fails.
    """
    import dagster as dg

    here = load_settings()
    if "DAGSTER_HOME" not in here.explicit or here.dagster_home != settings.dagster_home:
        raise RuntimeError(f"DAGSTER_HOME is {here.dagster_home}, expected {settings.dagster_home}")
    with dg.DagsterInstance.get() as instance:
        instance.get_runs(limit=1)


def init_mlflow_storage(settings: Settings) -> None:
    """Create (or migrate) the MLflow store (SQLite or PostgreSQL) once, before several processes open it.

    The MLflow server and the Bento service (which reads the registry straight from the SQLite file)
    would otherwise both run MLflow's schema migrations on a new store, and one of them fails
    ("table _alembic_tmp_model_version_tags already exists", seen on a fresh clone).
    """
    if settings.mlflow_artifact_root is None:
        return  # a server-backed store migrates itself once
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    if not settings.remote_storage:
        settings.mlflow_artifacts_dir.mkdir(parents=True, exist_ok=True)
    SqlAlchemyStore(settings.mlflow_tracking_uri, settings.mlflow_artifact_root)


def venv_bin(name: str) -> str:
    """An executable of this interpreter's environment (the venv), not whatever is first on PATH."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not installed next to {sys.executable}: run `make install`")
    return str(path)


def _answers(url: str, expect: str | None = None) -> bool:
    try:
        response = httpx.get(url, timeout=2.0)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and (expect is None or expect in response.text)


def dagster_daemons_healthy(dagster_url: str) -> bool:
    """Whether the webserver at ``dagster_url`` reports every daemon healthy."""
    query = "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }"
    try:
        response = httpx.post(f"{dagster_url}/graphql", json={"query": query}, timeout=5.0)
        statuses = response.json()["data"]["instance"]["daemonHealth"]["allDaemonStatuses"]
    except (httpx.HTTPError, KeyError, TypeError, ValueError):
        return False
    return all(s["healthy"] for s in statuses if s["required"])


def mlflow_server_argv(settings: Settings) -> list[str]:
    return [
        venv_bin("mlflow"),
        "server",
        "--backend-store-uri",
        settings.mlflow_tracking_uri,
        "--default-artifact-root",
        settings.mlflow_artifact_root,
        "--host",
        settings.host,
        "--port",
        str(settings.ports["mlflow"]),
        "--workers",
        "1",
    ]


def prometheus_config(settings: Settings) -> Path:
    """Write the local Prometheus configuration: scrape the BentoML service, load the alert rules."""
    prom_dir = settings.home / "prometheus"
    prom_dir.mkdir(parents=True, exist_ok=True)
    config = prom_dir / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 5s\n"
        "  evaluation_interval: 5s\n"
        "rule_files:\n"
        + "".join(f"  - {path}\n" for path in [ALERT_RULES, *load_settings().automation.extra_alert_rules])
        + "scrape_configs:\n"
        "  - job_name: recsys-serving\n"
        "    static_configs:\n"
        f"      - targets: ['{settings.host}:{settings.ports['bento']}']\n"
    )
    return config


def bento_spec(settings: Settings, env: dict[str, str] | None = None) -> ServiceSpec:
    """``bentoml serve`` of the recommendation service on ``settings``' host and BentoML port."""
    url = settings.url("bento")
    return ServiceSpec(
        name="bento",
        argv=[
            venv_bin("bentoml"),
            "serve",
            "serving.service:Recommender",
            "--host",
            settings.host,
            "--port",
            str(settings.ports["bento"]),
            "--working-dir",
            str(REPO_ROOT),
        ],
        port=settings.ports["bento"],
        url=url,
        ready=lambda: _answers(f"{url}/readyz"),
        # No trace exporter is configured: the OpenTelemetry SDK would only cost CPU per request
        # (a third of the service's throughput, docs/benchmarks.md).
        env={"OTEL_SDK_DISABLED": "true", **(env or {})},
    )


def stack_services(
    settings: Settings, *, with_mlflow: bool = True, with_prometheus: bool = True, with_bento: bool = True
) -> list[ServiceSpec]:
    """The processes ``recsys up`` starts, in start order.

    Args:
        settings: where everything lives.
        with_mlflow: start the MLflow UI.
        with_prometheus: start Prometheus when its binary is installed.
        with_bento: start the recommendation service (it serves once a champion is registered).
    """
    if not WORKSPACE_FILE.exists():
        raise FileNotFoundError(f"{WORKSPACE_FILE} is missing: run recsys from a checkout of the project")
    dagster_url = settings.url("dagster")
    specs = [
        ServiceSpec(
            name="dagster-webserver",
            argv=[
                venv_bin("dagster-webserver"),
                "-h",
                settings.host,
                "-p",
                str(settings.ports["dagster"]),
                "-w",
                str(WORKSPACE_FILE),
            ],
            port=settings.ports["dagster"],
            url=dagster_url,
            ready=lambda: _answers(f"{dagster_url}/server_info"),
        ),
        ServiceSpec(
            name="dagster-daemon",
            argv=[venv_bin("dagster-daemon"), "run", "-w", str(WORKSPACE_FILE)],
            ready=lambda: dagster_daemons_healthy(dagster_url),
        ),
    ]
    if with_mlflow:
        mlflow_url = settings.url("mlflow")
        specs.append(
            ServiceSpec(
                name="mlflow",
                argv=mlflow_server_argv(settings),
                # The GenAI job runner starts eight more processes that this platform never uses.
                env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                port=settings.ports["mlflow"],
                url=mlflow_url,
                ready=lambda: _answers(f"{mlflow_url}/health"),
            )
        )
    if with_bento:
        specs.append(bento_spec(settings))
    prometheus = shutil.which("prometheus")
    if with_prometheus and prometheus:
        prom_url = settings.url("prometheus")
        specs.append(
            ServiceSpec(
                name="prometheus",
                argv=[
                    prometheus,
                    f"--config.file={prometheus_config(settings)}",
                    f"--storage.tsdb.path={settings.home / 'prometheus' / 'data'}",
                    f"--web.listen-address={settings.host}:{settings.ports['prometheus']}",
                ],
                port=settings.ports["prometheus"],
                url=prom_url,
                ready=lambda: _answers(f"{prom_url}/-/ready"),
            )
        )
    return specs
