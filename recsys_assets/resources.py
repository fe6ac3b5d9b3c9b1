"""Dagster resources: thin, frozen handles on the platform's stores.

Each resource is configured from environment variables through ``dg.EnvVar`` when they are set, and
otherwise from :func:`recsys_core.settings.load_settings`'s embedded defaults, so the code location
works on a bare machine. They are built when the definitions load (``defs/resources.py``), never at
import. A resource hands out a plain client (``get_…()``) or plain values that the library modules
use; they never see Dagster. Every threshold that a Dagster object needs is a field of one of them,
so it shows in the UI and a run's config can override it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from recsys_assets.data.store import PreparedStore
from recsys_assets.ml.canary import CanaryRules
from recsys_core.control import ControlPlane
from recsys_core.registry import Registry
from recsys_core.settings import DEFAULT_TRAIN_BUCKET_ROWS, DEFAULT_TUNING_BUDGET_SECONDS, Settings, storage_path
from recsys_core.warehouse import Warehouse


class WarehouseResource(dg.ConfigurableResource):
    """The warehouse the pipeline extracts from: DuckDB file or PostgreSQL, by URI."""

    uri: str = Field(description="duckdb:///abs/path.duckdb or postgresql://user:pass@host/db")
    lock_timeout_seconds: float = Field(default=120.0, description="How long to wait for a locked DuckDB file.")

    def get_warehouse(self) -> Warehouse:
        return Warehouse(self.uri, lock_timeout=self.lock_timeout_seconds)


class PreparedDataResource(dg.ConfigurableResource):
    """Where prepared Parquet datasets live (``$RECSYS_HOME/prepared`` by default)."""

    root: str = Field(description="Directory or URI (s3://bucket/prefix/prepared) of the prepared datasets.")

    def get_store(self) -> PreparedStore:
        return PreparedStore(self.root)


class MLflowResource(dg.ConfigurableResource):
    """MLflow tracking and model registry (SQLite file by default, or an MLflow server)."""

    tracking_uri: str = Field(description="sqlite:////abs/mlflow.db or http://host:5000")
    artifact_root: str | None = Field(
        default=None, description="URI of the experiment's artifacts, file:// or s3:// (store without a server only)."
    )
    cache_dir: str = Field(description="Where downloaded model versions are cached.")

    def get_registry(self) -> Registry:
        """The registry's reading client."""
        return Registry(self.tracking_uri, self.artifact_root, Path(self.cache_dir))

    def get_control_plane(self) -> ControlPlane:
        """The one writer: training runs, versions, aliases and the canary plan."""
        return ControlPlane(self.tracking_uri, self.artifact_root, Path(self.cache_dir))


class ServingClient:
    """The running recommendation service's HTTP API (admin calls carry the bearer token)."""

    def __init__(self, url: str, token: str, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def ready(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.url}/readyz", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    def metrics(self) -> str:
        """The service's ``/metrics`` text (Prometheus exposition format).

        Raises:
            OSError: the service did not answer.
        """
        import httpx

        try:
            response = httpx.get(f"{self.url}/metrics", timeout=self.timeout)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise OSError(f"{self.url}/metrics: {exc}") from exc
        return response.text

    def admin(self, path: str, payload: dict | None = None) -> dict:
        """POST to an ``/admin`` endpoint; raise with the service's message on an error status."""
        import httpx

        response = httpx.post(
            f"{self.url}/admin/{path}",
            json=payload or {},
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=self.timeout,
        )
        if response.status_code >= 400:
            raise RuntimeError(f"{self.url}/admin/{path} answered {response.status_code}: {response.text[:500]}")
        return response.json()

    def converge(self, expected: tuple[int | None, int | None], timeout: float, agreeing: int = 4) -> dict:
        """Reload until ``agreeing`` answers in a row serve ``expected`` (champion, challenger), or
        ``timeout`` passes; return the last answer. A request reaches one worker (or replica): the
        others follow the registry within their poll interval, so consecutive answers all agreeing
        is what says the whole service serves it."""
        import time

        deadline = time.monotonic() + timeout
        in_a_row = 0
        while True:
            self.admin("reload")
            served = self.admin("canary")
            matches = (served["champion_version"], served["challenger_version"]) == expected
            in_a_row = in_a_row + 1 if matches else 0
            if in_a_row >= agreeing or time.monotonic() > deadline:
                return served
            if not matches:
                time.sleep(0.25)


class ServingResource(dg.ConfigurableResource):
    """The recommendation service (``bentoml serve`` locally, the Kubernetes Service in production)."""

    url: str = Field(description="Base URL of the service.")
    admin_token: str | None = Field(
        default=None, description="Bearer token of /admin; default: RECSYS_ADMIN_TOKEN or $RECSYS_HOME/admin_token."
    )
    home: str = Field(description="RECSYS_HOME (where the default token lives).")
    model_poll_seconds: float = Field(
        default=5.0, description="RECSYS_MODEL_POLL_SECONDS: how often every replica re-reads the registry."
    )
    ann_min_items: int = Field(
        default=100_000,
        description="RECSYS_ANN_MIN_ITEMS: versions of catalogues this large carry an ANN index, which serving uses.",
    )

    def get_client(self) -> ServingClient:
        from recsys_core.settings import admin_token

        return ServingClient(self.url, self.admin_token or admin_token(Path(self.home)))


class PrometheusResource(dg.ConfigurableResource):
    """Prometheus, when it runs: online KPIs are read from it, else from the feedback table."""

    url: str | None = Field(
        default=None, description="PROMETHEUS_URL, e.g. http://127.0.0.1:9090; unset: no Prometheus."
    )


class RetrainPolicyResource(dg.ConfigurableResource):
    """When the retrain sensor starts a retrain, and how the warehouse sensor paces extraction."""

    new_data_fraction: float = Field(
        default=0.2,
        description="RECSYS_RETRAIN_NEW_DATA_FRACTION: retrain when new positive events reach this "
        "share of the champion's training rows.",
    )
    retrain_cron: str = Field(
        default="0 3 1 * *", description="RECSYS_RETRAIN_CRON: the monthly retrain's ticks (UTC)."
    )
    backoff_seconds: int = Field(
        default=3600, description="RECSYS_RETRAIN_BACKOFF_SECONDS: first wait after a rejected candidate (doubles)."
    )
    crash_backoff_seconds: int = Field(
        default=300, description="RECSYS_RETRAIN_CRASH_BACKOFF_SECONDS: first wait after a failed retrain (doubles)."
    )
    kpi_ctr_drop: float = Field(
        default=0.8,
        description="RECSYS_KPI_CTR_DROP: without Prometheus, the champion's CTR below this share of "
        "its 7-day level is an alert.",
    )
    drift_share: float = Field(
        default=0.5, description="RECSYS_DRIFT_SHARE: share of drifted columns that means the data drifted."
    )
    drift_window_days: float = Field(
        default=7.0, description="RECSYS_DRIFT_WINDOW_DAYS: length of the two windows the drift report compares."
    )
    extract_min_interval_seconds: int = Field(
        default=300, description="RECSYS_EXTRACT_MIN_INTERVAL_SECONDS: at most one new ingest partition this often."
    )


class CanaryPolicyResource(dg.ConfigurableResource):
    """How a challenger is rolled out and judged: its traffic steps, the sequential test and the guardrails."""

    steps: list[float] = Field(
        default=[0.05, 0.2, 0.5], description="RECSYS_CANARY_STEPS: the challenger's traffic shares, step by step."
    )
    mode: str = Field(default="ab", description="RECSYS_CANARY_MODE: ab (split users) or interleaving.")
    min_impressions: int = Field(
        default=5000, description="RECSYS_CANARY_MIN_IMPRESSIONS: challenger impressions per look and per step."
    )
    max_impressions: int = Field(
        default=400_000, description="RECSYS_CANARY_MAX_IMPRESSIONS: no significant difference by then: promote."
    )
    alpha: float = Field(default=0.05, description="RECSYS_CANARY_ALPHA: the false-decision rate, all metrics.")
    tau: float = Field(default=0.05, description="RECSYS_CANARY_TAU: scale of the lifts the sequential test expects.")
    latency_margin: float = Field(
        default=0.5, description="RECSYS_CANARY_LATENCY_MARGIN: p99 may exceed the champion's by this share…"
    )
    latency_slack_ms: float = Field(default=5.0, description="RECSYS_CANARY_LATENCY_SLACK_MS: … plus this.")
    error_margin: float = Field(
        default=0.01, description="RECSYS_CANARY_ERROR_MARGIN: error rate may exceed the champion's by this."
    )
    min_requests: int = Field(
        default=100, description="RECSYS_CANARY_MIN_REQUESTS: per variant, before the guardrails judge."
    )

    def get_rules(self) -> CanaryRules:
        return CanaryRules(
            steps=tuple(self.steps),
            min_impressions=self.min_impressions,
            max_impressions=self.max_impressions,
            alpha=self.alpha,
            tau=self.tau,
            latency_margin=self.latency_margin,
            latency_slack_seconds=self.latency_slack_ms / 1000,
            error_margin=self.error_margin,
            min_requests=self.min_requests,
        )


class PreparationEngineResource(dg.ConfigurableResource):
    """The engine of the preparation: polars in the run's process, or Apache Spark through Dagster Pipes.

    With ``spark``, the assets launch ``recsys_assets/spark_jobs/prepare.py`` with ``spark-submit``
    (``PipesSubprocessClient``) on ``spark_master``: ``local[*]``, a standalone cluster
    (``spark://host:7077``) or Kubernetes (``k8s://https://…``, client mode: the run's pod is the
    driver). The job reports its counts back through Pipes; the asset's metadata and checks are the
    same for both engines.
    """

    engine: str = Field(default="polars", description="polars (in the run's process) or spark (through Dagster Pipes)")
    spark_master: str = Field(default="local[*]", description="local[*], spark://host:7077 or k8s://https://…")
    spark_conf: dict[str, str] = Field(
        default_factory=dict,
        description="More Spark settings (--conf key=value): executor memory and cores, s3a credentials, event log…",
    )

    @property
    def on_spark(self) -> bool:
        return self.engine == "spark"

    @property
    def spark_home(self) -> str:
        """The PySpark distribution installed beside this interpreter (found without importing it)."""
        spec = importlib.util.find_spec("pyspark")
        if spec is None:
            raise RuntimeError("RECSYS_PREP_ENGINE=spark needs PySpark: pip install 'recsys-assets[spark]'")
        return spec.submodule_search_locations[0]

    def submit_command(self, task: str) -> list[str]:
        """The ``spark-submit`` command line of one task of the preparation job."""
        submit = f"{self.spark_home}/bin/spark-submit"
        script = importlib.util.find_spec("recsys_assets.spark_jobs.prepare").origin
        conf = {"spark.log.level": "WARN", "spark.ui.showConsoleProgress": "false"}
        if self.spark_master.startswith("k8s://"):
            # Client mode in a pod (constants.PREPARATION_POD): the executors reach the driver at its
            # pod's address, and are owned by its pod.
            conf.update(
                {
                    "spark.driver.host": os.environ.get("POD_IP", ""),
                    "spark.kubernetes.driver.pod.name": os.environ.get("POD_NAME", ""),
                }
            )
            conf = {k: v for k, v in conf.items() if v}
        conf.update(self.spark_conf)
        command = [submit, "--master", self.spark_master, "--name", f"recsys-{task}"]
        for key, value in conf.items():
            command += ["--conf", f"{key}={value}"]
        return [*command, script]

    def run_spark(
        self, context: dg.AssetExecutionContext, extras: dict[str, Any]
    ) -> tuple[dg.MaterializeResult, list[dg.AssetCheckResult]]:
        """Run one task of the Spark job through Pipes; what it reported: the materialization's
        metadata, and the results of the asset checks it ran.

        Raises:
            dagster.DagsterPipesExecutionError: the job failed (its stderr is in the run's logs).
        """
        env = {"SPARK_HOME": self.spark_home, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
        client = dg.PipesSubprocessClient(env=env)
        command = self.submit_command(extras["task"])
        context.log.info(f"spark-submit on {self.spark_master}: {' '.join(command)}")
        results = client.run(context=context, command=command, extras=extras).get_results()
        materialized = [r for r in results if isinstance(r, dg.MaterializeResult)]
        checks = [r for r in results if isinstance(r, dg.AssetCheckResult)]
        return (materialized[0] if materialized else dg.MaterializeResult()), checks


class TrainingResource(dg.ConfigurableResource):
    """Where the two-tower model trains, and on how much of the history.

    One worker (the default) trains in the step's process, under ``strategy`` (``auto``: one device, or
    ``MirroredStrategy`` over the GPUs of the step's pod). More than one: the step writes the train side
    to the storage root and runs ``workers`` processes of ``recsys_assets.ml.train_worker`` under
    ``MultiWorkerMirroredStrategy``: on 127.0.0.1 beside the run (``launcher`` ``local``), or as the pods
    of an indexed Job (``kubernetes``: ``deploy/k8s/training.yaml``). Worker 0 exports the version.
    """

    window_days: int | None = Field(
        default=None, description="Train on the last N days before the holdout's cutoff (None: all the history)."
    )
    strategy: str = Field(default="auto", description="auto, one-device, mirrored or multi-worker")
    workers: int = Field(default=1, ge=1, description="Training processes (MultiWorkerMirroredStrategy above 1)")
    launcher: str = Field(default="local", description="local (127.0.0.1) or kubernetes (an indexed Job)")
    job_template: str = Field(
        default="/opt/recsys/deploy/k8s/training.yaml", description="The Job's template (kubernetes launcher)"
    )
    timeout_seconds: int = Field(default=6 * 3600, description="A distributed training running longer is stopped.")
    bucket_rows: int = Field(
        default=DEFAULT_TRAIN_BUCKET_ROWS, ge=1,
        description="Interactions per user bucket: a larger train side is read a bucket at a time and its "
        "examples stream from disk, so the training's memory does not grow with the events",
    )  # fmt: skip
    tuning_budget_seconds: int = Field(
        default=DEFAULT_TUNING_BUDGET_SECONDS, ge=0,
        description="Seconds of the per-training hyperparameter search on the validation split (0: off)",
    )  # fmt: skip

    @property
    def distributed(self) -> bool:
        return self.workers > 1

    @property
    def on_kubernetes(self) -> bool:
        return self.launcher == "kubernetes"

    def run_workers(self, context: dg.AssetExecutionContext, args: list[str], log_dir: Path, name: str) -> None:
        """Run the training's workers (``args``: the worker's arguments); ``name`` names the Kubernetes Job.

        Raises:
            dagster.Failure: a worker failed; the description says which and where its log is.
        """
        import yaml

        from recsys_assets.ml.distribute import (
            WorkersFailed,
            render_kubernetes_job,
            run_kubernetes_job,
            run_local_cluster,
        )

        args = [*args, "--strategy", "multi-worker"]
        try:
            if self.on_kubernetes:
                templates = [d for d in yaml.safe_load_all(Path(self.job_template).read_text()) if d]
                documents = render_kubernetes_job(templates, name, self.workers, args)
                context.log.info(f"training on {self.workers} pods: Job {name}")
                run_kubernetes_job(documents, self.timeout_seconds)
            else:
                context.log.info(f"training on {self.workers} workers on 127.0.0.1 (logs: {log_dir})")
                argv = [sys.executable, "-m", "recsys_assets.ml.train_worker", *args]
                run_local_cluster(argv, self.workers, log_dir, self.timeout_seconds)
        except WorkersFailed as exc:
            raise dg.Failure(description=str(exc)) from None


class RecsysHomeResource(dg.ConfigurableResource):
    """The local root (caches, the simulator's world) and the storage root of the run artifacts
    (reports, a training's split): the same directory by default, or object storage."""

    home: str = Field(description="RECSYS_HOME")
    storage: str = Field(default="", description="RECSYS_STORAGE_URI: a directory or s3://bucket/prefix")

    @property
    def path(self) -> Path:
        return Path(self.home)

    @property
    def models_dir(self) -> Path:
        """Local: a training's exported model before MLflow has it, and downloaded versions."""
        return self.path / "models"

    @property
    def storage_root(self) -> Path:
        return storage_path(self.storage or self.home)

    @property
    def reports_dir(self) -> Path:
        return self.storage_root / "reports"

    @property
    def runs_dir(self) -> Path:
        return self.storage_root / "runs"


def build_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """The resources of the code location, for ``settings``.

    A value whose variable was set in the environment is passed as ``dg.EnvVar`` (the UI then shows
    where it came from); the others are the settings' defaults.
    """

    def env_or(name: str, default):
        if name not in settings.explicit:
            return default
        return dg.EnvVar.int(name) if isinstance(default, int) and not isinstance(default, bool) else dg.EnvVar(name)

    auto = settings.automation
    return {
        "warehouse": WarehouseResource(uri=env_or("RECSYS_WAREHOUSE_URI", settings.warehouse_uri)),
        "prepared": PreparedDataResource(root=str(settings.prepared_dir)),
        "preparation": PreparationEngineResource(
            engine=env_or("RECSYS_PREP_ENGINE", settings.preparation.engine),
            spark_master=env_or("RECSYS_SPARK_MASTER", settings.preparation.spark_master),
            spark_conf=settings.preparation.spark_conf,
        ),
        **({"io_manager": dg.FilesystemIOManager(base_dir=settings.dagster_io_uri)} if settings.dagster_io_uri else {}),
        "training": TrainingResource(
            window_days=settings.training.window_days,
            strategy=settings.training.strategy,
            workers=settings.training.workers,
            launcher=settings.training.launcher,
            bucket_rows=settings.training.bucket_rows,
            tuning_budget_seconds=settings.training.tuning_budget_seconds,
        ),
        "recsys_home": RecsysHomeResource(
            home=env_or("RECSYS_HOME", str(settings.home)),
            storage=settings.storage_uri,
        ),
        "serving": ServingResource(
            url=env_or("RECSYS_SERVING_URL", settings.serving_url),
            home=str(settings.home),
            model_poll_seconds=settings.serving.model_poll_seconds,
            ann_min_items=env_or("RECSYS_ANN_MIN_ITEMS", settings.ann_min_items),
        ),
        "prometheus": PrometheusResource(url=env_or("PROMETHEUS_URL", settings.prometheus_url or "") or None),
        "mlflow": MLflowResource(
            tracking_uri=env_or("MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri),
            artifact_root=settings.mlflow_artifact_root,
            cache_dir=str(settings.home / "models" / "registry"),
        ),
        "retrain_policy": RetrainPolicyResource(
            new_data_fraction=auto.new_data_fraction,
            retrain_cron=env_or("RECSYS_RETRAIN_CRON", auto.retrain_cron),
            backoff_seconds=env_or("RECSYS_RETRAIN_BACKOFF_SECONDS", auto.backoff_seconds),
            crash_backoff_seconds=env_or("RECSYS_RETRAIN_CRASH_BACKOFF_SECONDS", auto.crash_backoff_seconds),
            kpi_ctr_drop=auto.kpi_ctr_drop,
            drift_share=auto.drift_share,
            drift_window_days=auto.drift_window_days,
            extract_min_interval_seconds=env_or(
                "RECSYS_EXTRACT_MIN_INTERVAL_SECONDS", auto.extract_min_interval_seconds
            ),
        ),
        "canary_policy": CanaryPolicyResource(
            steps=list(auto.canary_steps),
            mode=auto.canary_mode,
            min_impressions=env_or("RECSYS_CANARY_MIN_IMPRESSIONS", auto.canary_min_impressions),
            max_impressions=env_or("RECSYS_CANARY_MAX_IMPRESSIONS", auto.canary_max_impressions),
            alpha=auto.canary_alpha,
            tau=auto.canary_tau,
            latency_margin=auto.canary_latency_margin,
            latency_slack_ms=auto.canary_latency_slack_ms,
            error_margin=auto.canary_error_margin,
            min_requests=env_or("RECSYS_CANARY_MIN_REQUESTS", auto.canary_min_requests),
        ),
    }
