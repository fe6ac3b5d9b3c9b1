"""Dagster resources: thin, frozen handles on the platform's stores.

Each resource is configured from environment variables through ``dg.EnvVar`` when they are set, and
otherwise from :func:`recsys_core.settings.load_settings`'s embedded defaults, so the code location
works on a bare machine. A resource hands out a plain client (``get_…()``) that the library modules
use; they never see Dagster.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from recsys_assets.data.store import PreparedStore
from recsys_core.control import ControlPlane
from recsys_core.registry import Registry
from recsys_core.settings import Settings, storage_path
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

    def get_client(self) -> ServingClient:
        from recsys_core.settings import admin_token

        return ServingClient(self.url, self.admin_token or admin_token(Path(self.home)))


class PrometheusResource(dg.ConfigurableResource):
    """Prometheus, when it runs: online KPIs are read from it, else from the feedback table."""

    url: str | None = Field(
        default=None, description="PROMETHEUS_URL, e.g. http://127.0.0.1:9090; unset: no Prometheus."
    )


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
    """The resources of the code location, for ``settings``."""

    def _env_or(name: str, default: str) -> str | dg.EnvVar:
        """``dg.EnvVar(name)`` when the variable was set (the UI then shows where a value came from)."""
        return dg.EnvVar(name) if name in settings.explicit else default

    return {
        "warehouse": WarehouseResource(uri=_env_or("RECSYS_WAREHOUSE_URI", settings.warehouse_uri)),
        "prepared": PreparedDataResource(root=str(settings.prepared_dir)),
        **({"io_manager": dg.FilesystemIOManager(base_dir=settings.dagster_io_uri)} if settings.dagster_io_uri else {}),
        "recsys_home": RecsysHomeResource(
            home=_env_or("RECSYS_HOME", str(settings.home)),
            storage=settings.storage_uri,
        ),
        "serving": ServingResource(url=_env_or("RECSYS_SERVING_URL", settings.serving_url), home=str(settings.home)),
        "prometheus": PrometheusResource(url=_env_or("PROMETHEUS_URL", settings.prometheus_url or "") or None),
        "mlflow": MLflowResource(
            tracking_uri=_env_or("MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri),
            artifact_root=settings.mlflow_artifact_root,
            cache_dir=str(settings.home / "models" / "registry"),
        ),
    }
