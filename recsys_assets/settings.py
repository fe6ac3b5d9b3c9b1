"""Where everything lives: the one function that reads the environment.

Every embedded store is rooted in ``RECSYS_HOME`` (default ``./.recsys``, made absolute once, by the
first process that reads it, and handed to child processes through the environment). Every endpoint
can be overridden by an environment variable; the defaults work on a bare machine with no accounts
and no Docker.

| variable | default |
|---|---|
| ``RECSYS_HOME`` | ``./.recsys`` |
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
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORTS = {"dagster": 3000, "bento": 3001, "mlflow": 5000, "prometheus": 9090}


@dataclass(frozen=True)
class Settings:
    """Resolved locations and endpoints of one deployment of the platform."""

    home: Path
    dagster_home: Path
    warehouse_uri: str
    mlflow_tracking_uri: str
    host: str
    ports: Mapping[str, int]
    serving_url: str
    prometheus_url: str | None

    @property
    def environment(self) -> str:
        """``embedded`` when every store is a local file, ``production`` otherwise."""
        embedded = self.warehouse_uri.startswith("duckdb://") and self.mlflow_tracking_uri.startswith("sqlite://")
        return "embedded" if embedded else "production"

    @property
    def prepared_dir(self) -> Path:
        """Parquet files of the prepared data (cleaned events, features, interactions)."""
        return self.home / "prepared"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def mlflow_artifacts_dir(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def bentoml_home(self) -> Path:
        return self.home / "bentoml"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

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
    ports = {service: _port(env, service) for service in DEFAULT_PORTS}
    host = env.get("RECSYS_HOST", "127.0.0.1")
    return Settings(
        home=home,
        dagster_home=Path(env.get("DAGSTER_HOME") or home / "dagster").absolute(),
        warehouse_uri=env.get("RECSYS_WAREHOUSE_URI") or f"duckdb:///{home / 'warehouse.duckdb'}",
        mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
        host=host,
        ports=ports,
        serving_url=env.get("RECSYS_SERVING_URL") or f"http://{host}:{ports['bento']}",
        prometheus_url=env.get("PROMETHEUS_URL") or None,
    )


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
