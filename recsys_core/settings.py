"""The platform's settings: one typed, frozen object (:class:`Settings`, with its ``automation`` and
``serving`` parts), and :func:`load_settings`, the only code that reads the environment. Every value
is checked when it is read: a bad one raises ``ValueError`` naming the variable and the value.

(Frozen dataclasses and a few parsers rather than pydantic-settings: the variables' names are the
deployment's public interface, several defaults derive from others (``DAGSTER_HOME`` from
``RECSYS_HOME``), and the errors name the variable as the operator wrote it.)

Where everything lives:

The run artifacts (prepared data, reports, a training's split, MLflow's artifacts when MLflow has no
server, Dagster's step outputs) live under one root, ``RECSYS_STORAGE_URI``: ``$RECSYS_HOME`` by
default, or object storage (``s3://bucket/prefix``; ``AWS_ENDPOINT_URL`` for a server other than
AWS's); only caches stay on local disk then.

Every embedded store is rooted in ``RECSYS_HOME`` (default ``./.recsys``, made absolute once, by the
first process that reads it, and handed to child processes through the environment). Every endpoint
can be overridden by an environment variable; the defaults work on a bare machine with no accounts
and no Docker.

| variable | default |
|---|---|
| ``RECSYS_HOME`` | ``./.recsys`` |
| ``RECSYS_STORAGE_URI`` | ``$RECSYS_HOME``; or ``s3://bucket/prefix`` (credentials: the ``AWS_*`` variables) |
| ``DAGSTER_HOME`` | ``$RECSYS_HOME/dagster`` |
| ``RECSYS_WAREHOUSE_URI`` | ``duckdb:///$RECSYS_HOME/warehouse.duckdb`` (or ``postgresql://…``) |
| ``MLFLOW_TRACKING_URI`` | ``sqlite:///$RECSYS_HOME/mlflow/mlflow.db`` |
| ``RECSYS_HOST`` | ``127.0.0.1`` |
| ``RECSYS_DAGSTER_PORT`` | 3000 (Dagster UI) |
| ``RECSYS_BENTO_PORT`` | 3001 (BentoML) |
| ``RECSYS_MLFLOW_PORT`` | 5000 (MLflow UI) |
| ``RECSYS_PROMETHEUS_PORT`` | 9090 |
| ``RECSYS_SERVING_URL`` | ``http://$RECSYS_HOST:$RECSYS_BENTO_PORT`` |
| ``PROMETHEUS_URL`` | unset: online KPIs come from the feedback table |
| ``RECSYS_ANN_MIN_ITEMS`` | 100000: versions of larger catalogues carry and use an ANN index |
| ``RECSYS_SERVING_WORKERS`` | 2: worker processes of the service (a killed one is no outage) |
| ``RECSYS_PREP_ENGINE`` | ``polars`` (in the run's process); ``spark``: the preparation through Dagster Pipes |
| ``RECSYS_SPARK_MASTER`` | ``local[*]``; ``spark://host:7077``, ``k8s://https://…`` |
| ``RECSYS_SPARK_CONF`` | more Spark settings: ``key=value`` pairs separated by spaces |
| ``RECSYS_DAGSTER_STORAGE_URI`` | unset (SQLite under ``DAGSTER_HOME``); ``postgresql://…``: dagster-postgres |
| ``MLFLOW_TRACKING_USERNAME``, ``…_PASSWORD`` | unset: the registry's credentials (MLflow's basic-auth) |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from recsys_core.ann import DEFAULT_MIN_ITEMS

DEFAULT_PORTS = {"dagster": 3000, "bento": 3001, "mlflow": 5000, "prometheus": 9090}


@dataclass(frozen=True)
class Settings:
    """Resolved locations and endpoints of one deployment of the platform."""

    home: Path
    dagster_home: Path
    # RECSYS_STORAGE_URI: the one root of the run artifacts (a local directory, or s3://bucket/prefix).
    storage_uri: str
    warehouse_uri: str
    mlflow_tracking_uri: str
    host: str
    ports: Mapping[str, int]
    serving_url: str
    prometheus_url: str | None
    ann_min_items: int  # RECSYS_ANN_MIN_ITEMS: from this many tracks on, versions carry an ANN index and use it
    automation: AutomationSettings
    serving: ServingSettings
    preparation: PreparationSettings
    training: TrainingSettings
    # The variables that were set in the environment (Dagster's resources show those as EnvVar).
    explicit: frozenset[str] = field(default=frozenset(), compare=False)
    # MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD: the registry's credentials when the MLflow
    # server runs its basic-auth app (MLflow's client reads the same two variables).
    mlflow_credentials: tuple[str, str] | None = field(default=None, repr=False)
    # RECSYS_DAGSTER_STORAGE_URI: postgresql://… for the Dagster instance's run, event-log and schedule
    # storage (dagster-postgres); unset: SQLite files under DAGSTER_HOME.
    dagster_storage_uri: str | None = field(default=None, repr=False)

    @property
    def environment(self) -> str:
        """``embedded`` when every store is a local file, ``production`` otherwise."""
        embedded = self.warehouse_uri.startswith("duckdb://") and self.mlflow_tracking_uri.startswith("sqlite://")
        return "embedded" if embedded else "production"

    @property
    def remote_storage(self) -> bool:
        """Whether the run artifacts live in object storage (``RECSYS_STORAGE_URI=s3://…``)."""
        return "://" in self.storage_uri

    @property
    def storage(self) -> Path:
        """The root of the run artifacts: a ``pathlib.Path`` for a local directory, else a
        ``upath.UPath`` (fsspec) with the same interface, for object storage."""
        return storage_path(self.storage_uri)

    @property
    def prepared_dir(self) -> Path:
        """Parquet files of the prepared data (cleaned events, features, interactions)."""
        return self.storage / "prepared"

    @property
    def feedback_log_dir(self) -> Path:
        """The service's write-ahead log (``RECSYS_FEEDBACK_LOG_DIR``, else under the home)."""
        return self.serving.feedback_log_dir or self.home / "serving" / "spill"

    @property
    def runs_dir(self) -> Path:
        """Files a training run hands to the steps after it (its train/holdout split)."""
        return self.storage / "runs"

    @property
    def dagster_io_uri(self) -> str | None:
        """Where Dagster keeps the assets' step outputs: ``None`` (its default, under DAGSTER_HOME)
        for local storage, else under the storage root."""
        return f"{self.storage_uri.rstrip('/')}/dagster" if self.remote_storage else None

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def mlflow_artifacts_dir(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def mlflow_artifact_root(self) -> str | None:
        """The URI where a store without a server puts the experiment's artifacts (SQLite or
        PostgreSQL backend store): under the storage root when it is object storage (MLflow's own
        S3 support), else ``$RECSYS_HOME/mlflow/artifacts``; ``None`` for an MLflow server, which
        decides (its ``--default-artifact-root``)."""
        if self.mlflow_tracking_uri.startswith(("http://", "https://")):
            return None
        if self.remote_storage:
            return f"{self.storage_uri.rstrip('/')}/mlflow"
        return self.mlflow_artifacts_dir.as_uri()

    @property
    def bentoml_home(self) -> Path:
        return self.home / "bentoml"

    @property
    def reports_dir(self) -> Path:
        return self.storage / "reports"

    @property
    def run_dir(self) -> Path:
        """State of the local stack: PID file and process logs."""
        return self.home / "run"

    def url(self, service: str) -> str:
        return f"http://{self.host}:{self.ports[service]}"

    def child_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for a child process, so that it resolves exactly these settings."""
        env = dict(os.environ if base is None else base)
        env.update(
            RECSYS_HOME=str(self.home),
            RECSYS_STORAGE_URI=self.storage_uri,
            DAGSTER_HOME=str(self.dagster_home),
            RECSYS_WAREHOUSE_URI=self.warehouse_uri,
            MLFLOW_TRACKING_URI=self.mlflow_tracking_uri,
            BENTOML_HOME=str(self.bentoml_home),
            RECSYS_HOST=self.host,
            RECSYS_SERVING_URL=self.serving_url,
            TF_USE_LEGACY_KERAS="1",
        )
        for service, port in self.ports.items():
            env[f"RECSYS_{service.upper()}_PORT"] = str(port)
        if self.prometheus_url:
            env["PROMETHEUS_URL"] = self.prometheus_url
        if self.dagster_storage_uri:
            env["RECSYS_DAGSTER_STORAGE_URI"] = self.dagster_storage_uri
        if self.mlflow_credentials:
            env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = self.mlflow_credentials
        return env


def _port(env: Mapping[str, str], service: str) -> int:
    name = f"RECSYS_{service.upper()}_PORT"
    raw = env.get(name, str(DEFAULT_PORTS[service]))
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a port number") from None
    if not 0 < port < 65536:
        raise ValueError(f"{name}={port} is outside 1..65535")
    return port


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from ``env`` (default: the process environment).

    Args:
        env: the variables to read; tests pass their own mapping.

    Returns:
        The resolved settings. Nothing is created on disk.
    """
    env = os.environ if env is None else env
    home = Path(env.get("RECSYS_HOME") or ".recsys").expanduser().absolute()
    known = {"RECSYS_HOME", "DAGSTER_HOME", "RECSYS_WAREHOUSE_URI", "MLFLOW_TRACKING_URI", "RECSYS_SERVING_URL",
             "PROMETHEUS_URL", "RECSYS_ANN_MIN_ITEMS", "RECSYS_RETRAIN_BACKOFF_SECONDS",
             "RECSYS_RETRAIN_CRASH_BACKOFF_SECONDS", "RECSYS_EXTRACT_MIN_INTERVAL_SECONDS",
             "RECSYS_CANARY_MIN_IMPRESSIONS", "RECSYS_CANARY_MAX_IMPRESSIONS", "RECSYS_CANARY_MIN_REQUESTS",
             "RECSYS_RETRAIN_CRON", "RECSYS_PREP_ENGINE", "RECSYS_SPARK_MASTER"}  # fmt: skip
    ports = {service: _port(env, service) for service in DEFAULT_PORTS}
    host = env.get("RECSYS_HOST", "127.0.0.1")
    return Settings(
        home=home,
        dagster_home=Path(env.get("DAGSTER_HOME") or home / "dagster").absolute(),
        storage_uri=_storage_uri(env.get("RECSYS_STORAGE_URI"), home),
        warehouse_uri=env.get("RECSYS_WAREHOUSE_URI") or f"duckdb:///{home / 'warehouse.duckdb'}",
        mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
        host=host,
        ports=ports,
        serving_url=env.get("RECSYS_SERVING_URL") or f"http://{host}:{ports['bento']}",
        prometheus_url=env.get("PROMETHEUS_URL") or None,
        ann_min_items=_positive_int(env, "RECSYS_ANN_MIN_ITEMS", DEFAULT_MIN_ITEMS),
        automation=_automation(env),
        serving=_serving(env),
        preparation=_preparation(env),
        training=_training(env),
        explicit=frozenset(name for name in known if env.get(name)),
        mlflow_credentials=_credentials(env),
        dagster_storage_uri=_dagster_storage_uri(env.get("RECSYS_DAGSTER_STORAGE_URI")),
    )


def _storage_uri(uri: str | None, home: Path) -> str:
    """A local directory (absolute) or an ``s3://bucket[/prefix]`` URI."""
    if not uri:
        return str(home)
    if "://" not in uri:
        return str(Path(uri).expanduser().absolute())
    scheme, rest = uri.split("://", 1)
    if scheme not in ("s3", "file") or not rest.strip("/"):
        raise ValueError(f"RECSYS_STORAGE_URI={uri!r} is neither a directory nor s3://bucket[/prefix]")
    return str(Path(rest).absolute()) if scheme == "file" else uri.rstrip("/")


def storage_path(uri: str) -> Path:
    """``uri`` as a path object: ``pathlib.Path`` for a directory, ``upath.UPath`` for object storage
    (universal_pathlib over fsspec: imported only then, so the serving plane never needs it)."""
    if "://" not in uri:
        return Path(uri)
    from upath import UPath

    return UPath(uri)


def _dagster_storage_uri(uri: str | None) -> str | None:
    """``postgresql://…`` made ``postgresql+psycopg2://…``: SQLAlchemy 2.1 picks psycopg 3 for a bare
    ``postgresql://``, and dagster-postgres 0.29.27's storage then fails ("the connection is closed",
    seen on the daemon's heartbeats); with psycopg2, its driver, it works."""
    if not uri:
        return None
    if uri.startswith("postgresql://") or uri.startswith("postgres://"):
        return "postgresql+psycopg2://" + uri.split("://", 1)[1]
    return uri


def _credentials(env: Mapping[str, str]) -> tuple[str, str] | None:
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if bool(user) != bool(password):
        missing = "MLFLOW_TRACKING_PASSWORD" if user else "MLFLOW_TRACKING_USERNAME"
        raise ValueError(f"{missing} is not set: the MLflow credentials need both a user name and a password")
    return (user, password) if user else None


def admin_token(home: Path, env: Mapping[str, str] | None = None) -> str:
    """The bearer token of the service's ``/admin`` endpoints: ``RECSYS_ADMIN_TOKEN``, or the token
    kept in ``$RECSYS_HOME/admin_token`` (created, readable by its owner only, on first use)."""
    import secrets

    env = os.environ if env is None else env
    if env.get("RECSYS_ADMIN_TOKEN"):
        return env["RECSYS_ADMIN_TOKEN"]
    path = home / "admin_token"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(secrets.token_urlsafe(24))
        tmp.chmod(0o600)
        tmp.replace(path)
    return path.read_text().strip()


@dataclass(frozen=True)
class AutomationSettings:
    """The triggers' thresholds and cadences (environment variables, defaults for production)."""

    new_data_fraction: float  # RECSYS_RETRAIN_NEW_DATA_FRACTION: retrain when new events reach this share
    retrain_cron: str  # RECSYS_RETRAIN_CRON: the monthly retrain
    sensor_interval_seconds: int  # RECSYS_SENSOR_INTERVAL_SECONDS: how often the sensors look
    drift_share: float  # RECSYS_DRIFT_SHARE: share of drifted columns that means the data drifted
    drift_cron: str  # RECSYS_DRIFT_CRON: how often the drift report is refreshed
    drift_window_days: float  # RECSYS_DRIFT_WINDOW_DAYS: length of the compared windows
    backoff_seconds: int  # RECSYS_RETRAIN_BACKOFF_SECONDS: first wait after a gate failure (doubles)
    crash_backoff_seconds: int  # RECSYS_RETRAIN_CRASH_BACKOFF_SECONDS: first wait after a failed retrain run (doubles)
    kpi_ctr_drop: float  # RECSYS_KPI_CTR_DROP: without Prometheus, CTR below this share of its 7-day level alerts
    canary_steps: tuple[float, ...]  # RECSYS_CANARY_STEPS: the challenger's traffic shares, step by step
    canary_mode: str  # RECSYS_CANARY_MODE: ab (split users) or interleaving (team draft for the canary users)
    canary_min_impressions: int  # RECSYS_CANARY_MIN_IMPRESSIONS: challenger impressions per look and per step
    canary_max_impressions: int  # RECSYS_CANARY_MAX_IMPRESSIONS: no significant difference by then: promote
    canary_alpha: float  # RECSYS_CANARY_ALPHA: the canary's false-decision rate, all metrics together
    canary_tau: float  # RECSYS_CANARY_TAU: scale of the relative lifts the sequential test expects
    canary_latency_margin: float  # RECSYS_CANARY_LATENCY_MARGIN: p99 may exceed the champion's by this share…
    canary_latency_slack_ms: float  # RECSYS_CANARY_LATENCY_SLACK_MS: … plus this many milliseconds
    canary_error_margin: float  # RECSYS_CANARY_ERROR_MARGIN: error rate may exceed the champion's by this
    canary_min_requests: int  # RECSYS_CANARY_MIN_REQUESTS: per variant, before the guardrails judge
    retrain_run_config: dict  # RECSYS_RETRAIN_RUN_CONFIG: JSON run config of the retrain job (ops: …)
    extra_alert_rules: list[str]  # RECSYS_PROMETHEUS_EXTRA_RULES: more rule files for the local Prometheus
    extract_min_interval_seconds: int  # RECSYS_EXTRACT_MIN_INTERVAL_SECONDS: at most one extraction run per …
    executor: str  # RECSYS_EXECUTOR: default (Dagster's) or k8s (each step of a retrain in its own pod)


@dataclass(frozen=True)
class PreparationSettings:
    """Which engine prepares the data, and where Spark runs when it is Spark."""

    engine: str  # RECSYS_PREP_ENGINE: polars (in the run's process, the default) or spark (through Dagster Pipes)
    spark_master: str  # RECSYS_SPARK_MASTER: local[*], spark://host:7077, k8s://https://…
    # RECSYS_SPARK_CONF: more Spark settings, "key=value" pairs separated by spaces
    # (spark.executor.memory=4g spark.hadoop.fs.s3a.endpoint=…)
    spark_conf: dict[str, str]


@dataclass(frozen=True)
class TrainingSettings:
    """Where and on what the two-tower model trains."""

    # RECSYS_TRAIN_WINDOW_DAYS: train on the last N days before the holdout's cutoff; "all" (None): everything
    window_days: int | None
    # RECSYS_TRAIN_STRATEGY: auto, one-device, mirrored (the GPUs of one pod) or multi-worker (TF_CONFIG)
    strategy: str
    # RECSYS_TRAIN_WORKERS: more than 1 trains on that many worker processes (MultiWorkerMirroredStrategy),
    # on 127.0.0.1 beside the run (RECSYS_TRAIN_LAUNCHER=local) or as the pods of an indexed Job (kubernetes)
    workers: int
    launcher: str  # RECSYS_TRAIN_LAUNCHER: local or kubernetes (deploy/k8s/training.yaml)
    # RECSYS_TRAIN_BUCKET_ROWS: interactions per user bucket, what the training holds in memory at once;
    # a larger train side is read a bucket at a time and its examples stream from disk
    bucket_rows: int
    # RECSYS_TUNING_BUDGET_SECONDS: the per-training search of the model's hyperparameters on the
    # validation split (recsys_assets.ml.tuning), stopped between trials once spent; 0 turns it off
    tuning_budget_seconds: int


TRAIN_STRATEGIES = ("auto", "one-device", "mirrored", "multi-worker")
DEFAULT_TRAIN_BUCKET_ROWS = 2_000_000  # about 1 GB of examples and histories (docs/benchmarks.md)
# The demo's retrain, search and ranking stage included, stays within its minute (README, "Hyperparameters
# chosen at every training"): its first training then runs the warm start alone.
DEFAULT_TUNING_BUDGET_SECONDS = 10


def _training(env: Mapping[str, str]) -> TrainingSettings:
    raw = (env.get("RECSYS_TRAIN_WINDOW_DAYS") or "all").strip().lower()
    window = None if raw == "all" else int(raw) if raw.isdigit() and int(raw) > 0 else 0
    if window == 0:
        raise ValueError(f"RECSYS_TRAIN_WINDOW_DAYS={raw!r}: expected a number of days (1 or more) or all")
    return TrainingSettings(
        window_days=window,
        strategy=_choice(env, "RECSYS_TRAIN_STRATEGY", "auto", TRAIN_STRATEGIES),
        workers=_positive_int(env, "RECSYS_TRAIN_WORKERS", 1),
        launcher=_choice(env, "RECSYS_TRAIN_LAUNCHER", "local", ("local", "kubernetes")),
        bucket_rows=_positive_int(env, "RECSYS_TRAIN_BUCKET_ROWS", DEFAULT_TRAIN_BUCKET_ROWS),
        tuning_budget_seconds=_non_negative_int(env, "RECSYS_TUNING_BUDGET_SECONDS", DEFAULT_TUNING_BUDGET_SECONDS),
    )


def _preparation(env: Mapping[str, str]) -> PreparationSettings:
    conf = {}
    for pair in env.get("RECSYS_SPARK_CONF", "").split():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"RECSYS_SPARK_CONF: {pair!r} is not key=value")
        conf[key] = value
    return PreparationSettings(
        engine=_choice(env, "RECSYS_PREP_ENGINE", "polars", ("polars", "spark")),
        spark_master=env.get("RECSYS_SPARK_MASTER") or "local[*]",
        spark_conf=conf,
    )


def _number(env: Mapping[str, str], name: str, default: float, cast=float):
    raw = env.get(name, str(default))
    try:
        return cast(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def _automation(env: Mapping[str, str]) -> AutomationSettings:
    def number(name: str, default: float, cast=float):
        return _number(env, name, default, cast)

    return AutomationSettings(
        new_data_fraction=number("RECSYS_RETRAIN_NEW_DATA_FRACTION", 0.2),
        retrain_cron=env.get("RECSYS_RETRAIN_CRON", "0 3 1 * *"),
        sensor_interval_seconds=number("RECSYS_SENSOR_INTERVAL_SECONDS", 30, int),
        drift_share=number("RECSYS_DRIFT_SHARE", 0.5),
        drift_cron=env.get("RECSYS_DRIFT_CRON", "0 * * * *"),
        drift_window_days=number("RECSYS_DRIFT_WINDOW_DAYS", 7.0),
        backoff_seconds=number("RECSYS_RETRAIN_BACKOFF_SECONDS", 3600, int),
        crash_backoff_seconds=number("RECSYS_RETRAIN_CRASH_BACKOFF_SECONDS", 300, int),
        kpi_ctr_drop=number("RECSYS_KPI_CTR_DROP", 0.8),
        canary_steps=_fractions(env, "RECSYS_CANARY_STEPS", "0.05,0.2,0.5"),
        canary_mode=_choice(env, "RECSYS_CANARY_MODE", "ab", ("ab", "interleaving")),
        canary_min_impressions=number("RECSYS_CANARY_MIN_IMPRESSIONS", 5000, int),
        canary_max_impressions=number("RECSYS_CANARY_MAX_IMPRESSIONS", 400000, int),
        canary_alpha=number("RECSYS_CANARY_ALPHA", 0.05),
        canary_tau=number("RECSYS_CANARY_TAU", 0.05),
        canary_latency_margin=number("RECSYS_CANARY_LATENCY_MARGIN", 0.5),
        canary_latency_slack_ms=number("RECSYS_CANARY_LATENCY_SLACK_MS", 5.0),
        canary_error_margin=number("RECSYS_CANARY_ERROR_MARGIN", 0.01),
        canary_min_requests=number("RECSYS_CANARY_MIN_REQUESTS", 100, int),
        retrain_run_config=_json(env, "RECSYS_RETRAIN_RUN_CONFIG"),
        extra_alert_rules=[p for p in env.get("RECSYS_PROMETHEUS_EXTRA_RULES", "").split(os.pathsep) if p],
        extract_min_interval_seconds=number("RECSYS_EXTRACT_MIN_INTERVAL_SECONDS", 300, int),
        executor=_choice(env, "RECSYS_EXECUTOR", "default", ("default", "k8s")),
    )


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = _number(env, name, default, int)
    if value < 1:
        raise ValueError(f"{name}={value}: expected a positive number")
    return value


def _non_negative_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = _number(env, name, default, int)
    if value < 0:
        raise ValueError(f"{name}={value}: expected 0 or more")
    return value


def _fractions(env: Mapping[str, str], name: str, default: str) -> tuple[float, ...]:
    raw = env.get(name) or default
    try:
        values = tuple(float(part) for part in raw.split(","))
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected comma-separated fractions, e.g. 0.05,0.2,0.5") from None
    if any(not 0 < v <= 1 for v in values) or list(values) != sorted(values):
        raise ValueError(f"{name}={raw!r}: expected increasing fractions in (0, 1]")
    return values


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name) or default
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class ServingSettings:
    """The recommendation service's own knobs."""

    model_poll_seconds: float  # RECSYS_MODEL_POLL_SECONDS: how often the registry is read
    feedback_flush_seconds: float  # RECSYS_FEEDBACK_FLUSH_SECONDS: how often feedback lands
    warehouse_enabled: bool  # RECSYS_WAREHOUSE_URI=none: no warehouse (benchmarks)
    access_log: bool  # RECSYS_ACCESS_LOG=1: BentoML's access log (a line per request)
    fault_delay_seconds: float  # RECSYS_FAULT_CHALLENGER_DELAY_MS: a fault drill's extra challenger latency
    max_body_bytes: int  # RECSYS_MAX_BODY_BYTES: larger request bodies get a 413
    bentoml_metrics: bool  # RECSYS_BENTOML_METRICS=1: BentoML's own metrics middleware too (costly per request)
    trace_requests: bool  # RECSYS_TRACE_REQUESTS=1: OpenTelemetry spans for /recommend and /feedback too
    workers: int  # RECSYS_SERVING_WORKERS: worker processes of one service; with 2+, a dead one costs no outage
    fast_path: bool  # RECSYS_FAST_PATH=0: /recommend through BentoML's full request path (serving/fastpath.py)
    history_poll_seconds: float  # RECSYS_HISTORY_POLL_SECONDS: how often users' new plays are read from the warehouse
    history_max_users: int  # RECSYS_HISTORY_MAX_USERS: users whose recent plays a worker holds (LRU)
    # RECSYS_FEEDBACK_LOG_DIR: the write-ahead log of feedback and impressions, on a volume that outlives
    # the process (on Kubernetes, the replica's PersistentVolumeClaim); unset: $RECSYS_HOME/serving/spill
    feedback_log_dir: Path | None


def _serving(env: Mapping[str, str]) -> ServingSettings:
    """``RECSYS_FAULT_CHALLENGER_DELAY_MS`` is 0 in any real deployment: the canary's latency
    guardrail is tested with it."""

    def number(name: str, default: float) -> float:
        return _number(env, name, default)

    return ServingSettings(
        model_poll_seconds=number("RECSYS_MODEL_POLL_SECONDS", 5.0),
        feedback_flush_seconds=number("RECSYS_FEEDBACK_FLUSH_SECONDS", 2.0),
        warehouse_enabled=env.get("RECSYS_WAREHOUSE_URI") != "none",
        access_log=env.get("RECSYS_ACCESS_LOG", "0") == "1",
        fault_delay_seconds=max(number("RECSYS_FAULT_CHALLENGER_DELAY_MS", 0.0), 0.0) / 1000,
        max_body_bytes=int(number("RECSYS_MAX_BODY_BYTES", 65536)),
        bentoml_metrics=env.get("RECSYS_BENTOML_METRICS", "0") == "1",
        trace_requests=env.get("RECSYS_TRACE_REQUESTS", "0") == "1",
        workers=_positive_int(env, "RECSYS_SERVING_WORKERS", 2),
        fast_path=env.get("RECSYS_FAST_PATH", "1") != "0",
        history_poll_seconds=number("RECSYS_HISTORY_POLL_SECONDS", 10.0),
        history_max_users=_positive_int(env, "RECSYS_HISTORY_MAX_USERS", 200_000),
        feedback_log_dir=Path(env["RECSYS_FEEDBACK_LOG_DIR"]) if env.get("RECSYS_FEEDBACK_LOG_DIR") else None,
    )


def _json(env: Mapping[str, str], name: str) -> dict:
    import json

    raw = env.get(name)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object (a run config), got {type(value).__name__}")
    return value
