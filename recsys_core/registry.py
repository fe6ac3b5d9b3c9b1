"""MLflow tracking and the model registry: runs, versions, aliases and their history.

- One experiment (``recsys-two-tower``) with an absolute artifact location; one run per training with
  params, per-epoch metrics, data lineage (cutoff, row counts, data hash) and the model version's
  directory logged as a pyfunc model ("models from code", see ``pyfunc_model.py``).
- Registered model ``recsys-two-tower``: a blessed model becomes a new version with alias
  ``challenger``; the very first becomes ``champion`` at once. Every move is recorded on the versions
  it touches (``recsys.event.*`` tags, see ``control.py``). Nothing is half-registered.
- The canary's traffic plan lives here too, so every replica of the service serves the same split: a
  ``recsys.canary`` tag on the registered model (JSON: the challenger version it is for, the mode,
  the current step and fraction, and when each step started). The service reads it with the aliases
  in one call.

This module is the registry's *reading* client: the serving plane uses it and nothing more (an
import-linter contract keeps ``serving`` away from the writer). Every write (training runs, versions,
aliases, statuses, history, the canary plan) is in :mod:`recsys_core.control`, the one writer of the
control plane.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_NAME = "recsys-two-tower"
CHAMPION = "champion"
CHALLENGER = "challenger"
CANARY_TAG = "recsys.canary"
EVENT_PREFIX = "recsys.event."


class RegistryError(RuntimeError):
    """The registry cannot be reached or refused an operation; the message says which and why."""


@dataclass(frozen=True)
class VersionInfo:
    version: int
    aliases: list[str]
    run_id: str | None
    created_at: datetime
    tags: dict[str, str]

    @property
    def status(self) -> str:
        return self.tags.get("recsys.status", "")

    @property
    def history(self) -> list[dict]:
        """Every recorded move, in wall-clock order (ties: by the tag's key, the same on every host)."""
        events = [(k, json.loads(v)) for k, v in self.tags.items() if k.startswith(EVENT_PREFIX)]
        return [event for _, event in sorted(events, key=lambda pair: (pair[1]["at"], pair[0]))]

    def lineage(self, key: str) -> str | None:
        return self.tags.get(f"recsys.{key}")

    @property
    def lineage_tags(self) -> dict[str, str]:
        """What ``register(lineage=…)`` was given (data cut-off, row counts…), without the history."""
        return {
            k.removeprefix("recsys."): v
            for k, v in self.tags.items()
            if k.startswith("recsys.") and not k.startswith(EVENT_PREFIX) and k != "recsys.status"
        }


@dataclass(frozen=True)
class CanaryState:
    """The canary's traffic plan as the registry holds it."""

    version: int  # the challenger it applies to; any other challenger gets no traffic yet
    mode: str  # ab | interleaving
    step: int
    fraction: float
    started: list[dict]  # [{"step", "fraction", "at"}], one per step so far

    @classmethod
    def parse(cls, raw: str | None) -> CanaryState | None:
        if not raw:
            return None
        value = json.loads(raw)
        return cls(int(value["version"]), value["mode"], int(value["step"]), float(value["fraction"]),
                   list(value["started"]))  # fmt: skip

    def step_starts(self) -> list[tuple[int, float, datetime]]:
        """(step, fraction, start) for every step so far, oldest first."""
        return [(int(s["step"]), float(s["fraction"]), datetime.fromisoformat(s["at"])) for s in self.started]


@dataclass(frozen=True)
class ServingState:
    """What the service follows, read in one registry call: the aliases and the canary plan."""

    champion: int | None
    challenger: int | None
    canary: CanaryState | None

    @property
    def fraction(self) -> float:
        """The share of users who get the challenger now (0 until its canary is started)."""
        if self.challenger is None or self.canary is None or self.canary.version != self.challenger:
            return 0.0
        return self.canary.fraction

    @property
    def mode(self) -> str:
        return self.canary.mode if self.canary else "ab"


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Registry:
    """The MLflow store of one deployment.

    Args:
        tracking_uri: ``sqlite:////abs/mlflow.db``, ``http://mlflow:5000``, …
        artifact_root: where the experiment's artifacts go: a URI (``file:///abs``, ``s3://bucket/prefix``)
            or an absolute directory; ``None`` lets the server decide.
        cache_dir: where downloaded model versions are kept.
        cache_keep: how many versions the cache keeps (the most recently used); older ones are
            deleted after each download.
    """

    def __init__(self, tracking_uri: str, artifact_root: str | Path | None, cache_dir: Path, cache_keep: int = 4):
        self.tracking_uri = tracking_uri
        if isinstance(artifact_root, Path) or (artifact_root and "://" not in artifact_root):
            artifact_root = Path(artifact_root).resolve().as_uri()
        self.artifact_root: str | None = artifact_root
        self.cache_dir = cache_dir
        self.cache_keep = cache_keep

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        from mlflow.exceptions import MlflowException

        try:
            yield
        except (MlflowException, OSError) as exc:
            raise RegistryError(f"{what} failed on the MLflow store {self.tracking_uri}: {exc}") from exc

    # --- reachability -------------------------------------------------------------------------

    def check(self) -> None:
        """Fail fast, naming the store, if it cannot be reached or written."""
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RegistryError(f"the MLflow store {self.tracking_uri} is not writable: {exc}") from exc
        elif self.tracking_uri.startswith(("http://", "https://")):
            import httpx

            try:
                httpx.get(f"{self.tracking_uri.rstrip('/')}/health", timeout=5.0).raise_for_status()
            except httpx.HTTPError as exc:
                raise RegistryError(f"cannot reach the MLflow store {self.tracking_uri}: {exc}") from exc
        with self._errors("reaching the store"):
            self.client().search_experiments(max_results=1)

    # --- versions -----------------------------------------------------------------------------

    def _version(self, mv) -> VersionInfo:
        return VersionInfo(
            version=int(mv.version),
            aliases=list(mv.aliases or []),
            run_id=mv.run_id,
            created_at=datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC),
            tags=dict(mv.tags or {}),
        )

    def versions(self) -> list[VersionInfo]:
        from mlflow.exceptions import MlflowException

        with self._errors("listing the versions"):
            try:
                found = self.client().search_model_versions(f"name='{MODEL_NAME}'")
                # The search leaves the versions' aliases out: the registered model has them.
                model_aliases = self.client().get_registered_model(MODEL_NAME).aliases if found else {}
            except MlflowException as exc:
                if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
                    return []
                raise
        aliases: dict[int, list[str]] = {}
        for alias, version in sorted(model_aliases.items()):
            aliases.setdefault(int(version), []).append(alias)
        return sorted(
            (replace(self._version(mv), aliases=aliases.get(int(mv.version), [])) for mv in found),
            key=lambda v: v.version,
        )

    def by_alias(self, alias: str) -> VersionInfo | None:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client().get_model_version_by_alias(MODEL_NAME, alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise RegistryError(f"reading the alias {alias} failed on {self.tracking_uri}: {exc}") from exc
        return self._version(mv)

    def serving_state(self) -> ServingState:
        """The aliases and the canary plan, from one read of the registered model."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client().get_registered_model(MODEL_NAME)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                return ServingState(None, None, None)
            raise RegistryError(f"reading {MODEL_NAME} failed on {self.tracking_uri}: {exc}") from exc
        except OSError as exc:
            raise RegistryError(f"reading {MODEL_NAME} failed on {self.tracking_uri}: {exc}") from exc
        aliases = {alias: int(version) for alias, version in (model.aliases or {}).items()}
        return ServingState(
            aliases.get(CHAMPION), aliases.get(CHALLENGER), CanaryState.parse(model.tags.get(CANARY_TAG))
        )

    def canary_state(self) -> CanaryState | None:
        return self.serving_state().canary

    def get(self, version: int) -> VersionInfo:
        with self._errors(f"reading version {version}"):
            return self._version(self.client().get_model_version(MODEL_NAME, str(version)))

    def run_params(self, run_id: str) -> dict[str, str]:
        """The parameters a training run logged (strings, as MLflow keeps them)."""
        with self._errors(f"reading run {run_id}"):
            return dict(self.client().get_run(run_id).data.params)

    # --- artifacts ----------------------------------------------------------------------------

    def download(self, version: int) -> Path:
        """The version's model directory, downloaded once into the cache.

        The cache is keyed by version *and* run id: two stores (a test's and a service's, a store
        wiped and recreated) both have a version 1, and a cache keyed by number alone once served one
        store's model as the other's. The download goes through this registry's own client, never
        MLflow's process-wide tracking URI, which another thread may have pointed elsewhere.
        """
        with self._errors(f"downloading version {version}"):
            client = self.client()
            run_id = client.get_model_version(MODEL_NAME, str(version)).run_id or "norun"
            return self._fetch(
                lambda: client.get_model_version_download_uri(MODEL_NAME, str(version)),
                key=f"v{version}-{run_id[:12]}",
                what=f"version {version}",
            )

    def download_logged(self, model_uri: str) -> Path:
        """A logged model (``models:/m-…``, registered or not: a candidate between its training
        and its evaluation, which may run in another pod) downloaded once into the cache."""
        with self._errors(f"downloading {model_uri}"):
            return self._fetch(lambda: model_uri, key="c-" + model_uri.rsplit("/", 1)[-1][:40], what=model_uri)

    def _fetch(self, source: Callable[[], str], key: str, what: str) -> Path:
        import mlflow

        target = self.cache_dir / key
        if (target / "manifest.json").exists():
            os.utime(target)  # most recently used: the last to be evicted
            return target
        tmp = self.cache_dir / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:  # a failed download leaves no temporary directory behind
            fetched = mlflow.artifacts.download_artifacts(
                artifact_uri=source(), dst_path=str(tmp), tracking_uri=self.tracking_uri
            )
            manifest = next(Path(fetched).rglob("manifest.json"), None)
            if manifest is None:
                raise RegistryError(f"{what} has no manifest.json: it is not a model version")
            # Several workers of one service download the same version at start-up. The first rename
            # wins; a later one finds the target there and keeps it: deleting it (as this once did)
            # pulled the files from under a worker that was loading them, which then served no champion.
            try:
                manifest.parent.rename(target)
            except OSError:
                if not (target / "manifest.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._evict(keep=target)
        return target

    def _evict(self, keep: Path) -> None:
        """Delete all but the ``cache_keep`` most recently used versions (never ``keep``). A loaded
        version does not need its files (the arrays are read into memory), so eviction is safe."""
        cached = [p for p in [*self.cache_dir.glob("v*-*"), *self.cache_dir.glob("c-*")] if p.is_dir() and p != keep]
        cached.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in cached[max(self.cache_keep - 1, 0) :]:
            log.info("model cache: evicting %s (keeping the %d most recent)", old.name, self.cache_keep)
            shutil.rmtree(old, ignore_errors=True)
