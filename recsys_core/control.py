"""The control plane: the one writer of the registry's state.

Registering a version, promoting, rolling back, rejecting a challenger and moving the canary's traffic
plan all go through :class:`ControlPlane`, and nothing else writes aliases or the ``recsys.canary``
tag: the registry asset, the deployment and canary assets and the ``recsys model`` commands use it.
The serving plane only reads (:class:`recsys_core.registry.Registry`).

No alias ever points at a version that cannot be served: before a move, the version is downloaded,
loaded and queried in a separate process (:mod:`recsys_core.validation`). A new version that fails is
registered without an alias, with status ``rejected`` and the reason in its history, so the retrain
loop goes on; a promotion or rollback to one is refused with the reason.

Every move is recorded on the versions it touches as a ``recsys.event.<time>-<random>`` tag (JSON:
when, action, alias, from, to, why, by) plus a ``recsys.status`` tag. The key needs no read of the
existing history, so concurrent moves from several threads, processes or hosts never overwrite one
another; the history is ordered by wall-clock time, ties broken by the key.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from recsys_core.registry import (
    CANARY_TAG,
    CHALLENGER,
    CHAMPION,
    EVENT_PREFIX,
    MODEL_NAME,
    CanaryState,
    Registry,
    RegistryError,
    VersionInfo,
    utc_now_iso,
)
from recsys_core.validation import DEFAULT_TIMEOUT_S, UnservableVersion, Validation, validate_in_subprocess

log = logging.getLogger(__name__)

EXPERIMENT = "recsys-two-tower"
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
PIP_REQUIREMENTS = ["recsys-assets", "mlflow==3.17.2", "numpy", "pandas", "polars==2.1.0"]
# MLflow's fluent API (log_model) works on process-wide URIs: one caller at a time.
_FLUENT_API = threading.Lock()


class ControlPlane(Registry):
    """The registry's reads, plus the only writes of aliases, statuses, history and the canary plan.

    Args:
        validate_timeout_s: how long the separate-process load of a version may take before the
            version is declared unservable.
    """

    def __init__(
        self,
        tracking_uri: str,
        artifact_root: str | Path | None,
        cache_dir: Path,
        *,
        validate_timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        super().__init__(tracking_uri, artifact_root, cache_dir)
        self.validate_timeout_s = validate_timeout_s

    def validate(self, version: int) -> Validation:
        """Load ``version`` and run the smoke query in a child process.

        Raises:
            UnservableVersion: with the reason the child gave.
        """
        result = validate_in_subprocess(
            self.tracking_uri, version, self.cache_dir / "validation", timeout_s=self.validate_timeout_s
        )
        log.info("version %d loads and answers (%d items, %.0f ms load, %.1f s check)",
                 version, result.items, result.load_ms, result.wall_s)  # fmt: skip
        return result

    def register(self, *, model_uri: str, run_id: str, lineage: dict[str, Any], reason: str, by: str) -> VersionInfo:
        """Create a version: ``challenger``, or ``champion`` if there is none yet.

        Raises:
            UnservableVersion: the version cannot be served; it stays registered, with no alias,
                status ``rejected`` and the reason in its history.
            RegistryError: the registry refused; the version, if created, has been deleted.
        """
        from mlflow.exceptions import MlflowException

        client = self.client()
        with self._errors("creating the registered model"):
            try:
                client.create_registered_model(
                    MODEL_NAME, description="Two-tower retrieval model (TFRS) of recsys-assets."
                )
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        champion = self.by_alias(CHAMPION)
        with self._errors("creating the version"):
            # A logged model's URI (models:/m-…) names its model id too: an MLflow server refuses the
            # source without it (the SQLite store does not check).
            model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
            mv = client.create_model_version(MODEL_NAME, source=model_uri, run_id=run_id, model_id=model_id, tags={
                **{f"recsys.{k}": str(v) for k, v in lineage.items()},
            })  # fmt: skip
        version = int(mv.version)
        try:
            self.validate(version)
        except UnservableVersion as exc:
            self._reject_unservable(version, exc.reason, by=by)
            raise
        try:
            if champion is None:
                self._move(CHAMPION, version, action="registered as the first champion", reason=reason, by=by,
                           validated=True)  # fmt: skip
            else:
                self._move(CHALLENGER, version, action="registered as challenger", reason=reason, by=by,
                           validated=True)  # fmt: skip
        except BaseException:
            log.exception("registering version %d failed: deleting it", version)
            client.delete_model_version(MODEL_NAME, str(version))
            raise
        return self.get(version)

    # --- runs (the training plane's experiment tracking) ----------------------------------------

    def experiment_id(self) -> str:
        with self._errors("creating the experiment"):
            client = self.client()
            experiment = client.get_experiment_by_name(EXPERIMENT)
            if experiment is not None:
                return experiment.experiment_id
            return client.create_experiment(EXPERIMENT, artifact_location=self.artifact_root)

    def start_run(self, run_name: str, tags: dict[str, str], parent: str | None = None) -> str:
        """A new run of the experiment; with ``parent``, nested under that run (the MLflow UI shows it
        there: the tag ``mlflow.parentRunId``, what ``mlflow.start_run(nested=True)`` sets)."""
        nesting = {"mlflow.parentRunId": parent} if parent else {}
        with self._errors("creating the training run"):
            run = self.client().create_run(self.experiment_id(), run_name=run_name, tags={**tags, **nesting})
        return run.info.run_id

    def log_run(
        self,
        run_id: str,
        *,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        history: list[dict] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Log params, final metrics, per-epoch metrics (as steps) and tags in one batch."""
        from mlflow.entities import Metric, Param, RunTag

        ts = int(time.time() * 1000)
        metric_rows = [Metric(k, float(v), ts, 0) for k, v in (metrics or {}).items() if v is not None]
        for step, record in enumerate(history or [], start=1):
            for k, v in record.items():
                if isinstance(v, int | float) and k != "epoch":
                    prefix = "refit_" if record.get("phase") == "refit" else ""
                    metric_rows.append(Metric(f"{prefix}{k}".replace("@", "_at_"), float(v), ts, step))
        metric_rows = [Metric(m.key.replace("@", "_at_"), m.value, m.timestamp, m.step) for m in metric_rows]
        with self._errors("logging the run"):
            client = self.client()
            for start in range(0, max(len(metric_rows), 1), 900):
                client.log_batch(
                    run_id,
                    metrics=metric_rows[start : start + 900],
                    params=[Param(k, str(v)[:6000]) for k, v in (params or {}).items()] if start == 0 else [],
                    tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()] if start == 0 else [],
                )

    def log_model(self, run_id: str, model_dir: Path) -> str:
        """Log the version directory as the run's pyfunc model; return the model URI."""
        import mlflow

        # MLflow's fluent API works on process-wide URIs: hold them for the whole call.
        with _FLUENT_API, self._errors("logging the model"):
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_registry_uri(self.tracking_uri)
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(PYFUNC_FILE),
                    artifacts={"model_dir": str(model_dir)},
                    pip_requirements=PIP_REQUIREMENTS,
                )
        return info.model_uri

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        with self._errors("closing the run"):
            self.client().set_terminated(run_id, status=status)

    def fail_abandoned_runs(self, is_active: Callable[[str], bool]) -> list[str]:
        """End as FAILED the training runs left RUNNING by a process that died (``kill -9``, the
        kernel's OOM killer, a lost node): those whose Dagster run (tag ``dagster.run_id``) is not
        ``is_active`` any more. Returns the MLflow run ids it closed."""
        closed = []
        with self._errors("closing abandoned training runs"):
            client = self.client()
            experiment = client.get_experiment_by_name(EXPERIMENT)
            if experiment is None:
                return []
            running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'", max_results=500)
            for run in running:
                owner = run.data.tags.get("dagster.run_id")
                if owner is None or is_active(owner):
                    continue
                client.set_tag(run.info.run_id, "recsys.ended_by", f"its Dagster run {owner} ended without closing it")
                client.set_terminated(run.info.run_id, status="FAILED")
                log.warning(
                    "training run %s of Dagster run %s was left RUNNING: ended as FAILED", run.info.run_id, owner
                )
                closed.append(run.info.run_id)
        return closed

    def _reject_unservable(self, version: int, reason: str, *, by: str) -> None:
        event = {"at": utc_now_iso(), "action": "rejected: cannot be served", "alias": None,
                 "from": None, "to": None, "reason": reason[:4000], "by": by}  # fmt: skip
        log.error("version %d is registered without an alias: it cannot be served: %s", version, reason)
        self._record(version, event)
        with self._errors(f"marking version {version} rejected"):
            self.client().set_model_version_tag(MODEL_NAME, str(version), "recsys.status", "rejected")

    def _move(
        self, alias: str, version: int, *, action: str, reason: str, by: str, validated: bool = False
    ) -> VersionInfo | None:
        """Point ``alias`` at ``version`` (one call) and record the move on both versions.

        Raises:
            UnservableVersion: ``version`` failed the separate-process load; nothing moved.
        """
        client = self.client()
        previous = self.by_alias(alias)
        if not validated:
            self.validate(version)
        with self._errors(f"moving {alias} to version {version}"):
            client.set_registered_model_alias(MODEL_NAME, alias, str(version))
            event = {
                "at": utc_now_iso(),
                "action": action,
                "alias": alias,
                "from": previous.version if previous else None,
                "to": version,
                "reason": reason,
                "by": by,
            }
            for v in {version, previous.version if previous else None} - {None}:
                self._record(v, event)
            client.set_model_version_tag(MODEL_NAME, str(version), "recsys.status", alias)
            if previous and previous.version != version:
                # A champion replaced retires; a challenger replaced before its canary ended is superseded.
                status = "retired" if alias == CHAMPION else "superseded"
                client.set_model_version_tag(MODEL_NAME, str(previous.version), "recsys.status", status)
        return previous

    def _record(self, version: int, event: dict) -> None:
        """Add ``event`` to ``version``'s history: one tag whose key cannot collide with another
        writer's (its time, then a random suffix: two moves at once, from any hosts, both stay)."""
        stamp = datetime.fromisoformat(event["at"]).strftime("%Y%m%dT%H%M%S%f")
        key = f"{EVENT_PREFIX}{stamp}-{uuid.uuid4().hex[:12]}"
        with self._errors(f"recording {event['action']!r} on version {version}"):
            self.client().set_model_version_tag(MODEL_NAME, str(version), key, json.dumps(event))

    def promote(self, version: int | None = None, *, reason: str, by: str) -> VersionInfo:
        """Make ``version`` (default: the challenger) the champion; the challenger alias is cleared."""
        challenger = self.by_alias(CHALLENGER)
        if version is None:
            if challenger is None:
                raise RegistryError("there is no challenger to promote")
            version = challenger.version
        else:
            self.get(version)  # a version that does not exist is named as such
        self._move(CHAMPION, version, action="promoted to champion", reason=reason, by=by)
        if challenger is not None and challenger.version == version:
            with self._errors("clearing the challenger alias"):
                self.client().delete_registered_model_alias(MODEL_NAME, CHALLENGER)
                self._end_canary()
                self._record(version, {"at": utc_now_iso(), "action": "challenger alias cleared (promoted)",
                                       "alias": CHALLENGER, "from": version, "to": None, "reason": reason,
                                       "by": by})  # fmt: skip
        return self.get(version)

    def reject_challenger(self, *, reason: str, by: str) -> VersionInfo:
        """The canary lost: clear the challenger alias and record why (the champion stays)."""
        challenger = self.by_alias(CHALLENGER)
        if challenger is None:
            raise RegistryError("there is no challenger to roll back")
        client = self.client()
        with self._errors("rolling back the challenger"):
            client.delete_registered_model_alias(MODEL_NAME, CHALLENGER)
            self._end_canary()
            event = {"at": utc_now_iso(), "action": "challenger rolled back", "alias": CHALLENGER,
                     "from": challenger.version, "to": None, "reason": reason, "by": by}  # fmt: skip
            self._record(challenger.version, event)
            client.set_model_version_tag(MODEL_NAME, str(challenger.version), "recsys.status", "rolled_back")
        return self.get(challenger.version)

    def rollback(self, to: int | None = None, *, reason: str, by: str) -> VersionInfo:
        """Move ``champion`` back: to ``to``, or to the version that was champion before this one."""
        current = self.by_alias(CHAMPION)
        if current is None:
            raise RegistryError("there is no champion to roll back")
        if to is None:
            before = [
                e["from"]
                for e in current.history
                if e["alias"] == CHAMPION and e["to"] == current.version and e["from"]
            ]
            if not before:
                raise RegistryError(f"version {current.version} has no earlier champion to roll back to; use --to")
            to = before[-1]
        if to == current.version:
            raise RegistryError(f"version {to} is already the champion")
        existing = {v.version for v in self.versions()}
        if to not in existing:
            raise RegistryError(f"version {to} does not exist (versions: {sorted(existing)})")
        self._move(CHAMPION, to, action="rolled back to", reason=reason, by=by)
        with self._errors("marking the rolled-back version"):
            self.client().set_model_version_tag(MODEL_NAME, str(current.version), "recsys.status", "rolled_back")
        return self.get(to)

    # --- audit ----------------------------------------------------------------------------------

    def audit_aliases(self, settle_seconds: float = 2.0) -> list[dict]:
        """Detect and record alias moves that the platform did not make (a person in the MLflow UI, a
        script with the store's credentials): an alias whose target is not the ``to`` of the last move
        recorded for it. Each is recorded as an event ``by: "unknown"`` on the version it now points
        at (or left), so the history stays complete and the next audit is quiet. Returns them.

        A move of the platform sets the alias, then records it, a few milliseconds apart: a mismatch
        is only reported if it is still there ``settle_seconds`` later.
        """
        suspects = self._unrecorded_moves()
        if suspects and settle_seconds > 0:
            time.sleep(settle_seconds)
            suspects = [m for m in self._unrecorded_moves() if m in suspects]
        found = []
        for alias, recorded, actual in suspects:
            event = {"at": utc_now_iso(), "action": f"{alias} moved outside the platform", "alias": alias,
                     "from": recorded, "to": actual, "reason": "detected by the registry audit: no move of the "
                     "control plane matches", "by": "unknown"}  # fmt: skip
            log.warning("alias %s points at version %s, the platform last moved it to %s: recorded", alias, actual,
                        recorded)  # fmt: skip
            self._record(actual if actual is not None else recorded, event)
            found.append(event)
        return found

    def _unrecorded_moves(self) -> list[tuple[str, int | None, int | None]]:
        state = self.serving_state()
        last: dict[str, tuple[str, int | None]] = {}
        for version in self.versions():
            for event in version.history:
                alias = event.get("alias")
                if alias in (CHAMPION, CHALLENGER) and event["at"] >= last.get(alias, ("", None))[0]:
                    last[alias] = (event["at"], event["to"])
        moves = []
        for alias, actual in ((CHAMPION, state.champion), (CHALLENGER, state.challenger)):
            recorded = last.get(alias, ("", None))[1]
            if actual != recorded:
                moves.append((alias, recorded, actual))
        return moves

    def set_canary(self, version: int, *, step: int, fraction: float, mode: str, reason: str, by: str) -> CanaryState:
        """Start the canary of challenger ``version`` (``step`` 0) or move it to a later step.

        Raises:
            RegistryError: ``version`` is not the challenger, or the step goes backwards.
        """
        challenger = self.by_alias(CHALLENGER)
        if challenger is None or challenger.version != version:
            raise RegistryError(
                f"version {version} is not the challenger (it is {getattr(challenger, 'version', None)})"
            )
        if not 0 <= fraction <= 1:
            raise RegistryError(f"fraction={fraction!r}: expected a share in [0, 1]")
        current = self.canary_state()
        previous = current.started if current is not None and current.version == version else []
        if previous and step < previous[-1]["step"]:
            raise RegistryError(f"the canary of v{version} is at step {previous[-1]['step']}: it does not go back")
        at = utc_now_iso()
        state = CanaryState(version, mode, step, fraction, [*previous, {"step": step, "fraction": fraction, "at": at}])
        payload = {"version": version, "mode": mode, "step": step, "fraction": fraction, "started": state.started}
        with self._errors(f"setting the canary of version {version}"):
            self._set_model_tag(CANARY_TAG, json.dumps(payload))
            self._record(version, {"at": at, "action": f"canary at {fraction:.0%} "
                                   f"({mode}, step {step})", "alias": CHALLENGER, "from": version, "to": version,
                                   "reason": reason, "by": by})  # fmt: skip
        return state

    def _set_model_tag(self, key: str, value: str, attempts: int = 5) -> None:
        """Set a registered-model tag. MLflow's SQL store upserts a tag by reading then inserting, so two
        writers at once can hit its unique constraint (seen with four threads and two processes): the
        loser retries, and the last writer wins, as one writer after the other would."""
        import time

        from mlflow.exceptions import MlflowException

        for attempt in range(attempts):
            try:
                self.client().set_registered_model_tag(MODEL_NAME, key, value)
                return
            except MlflowException as exc:
                if "UNIQUE constraint" not in str(exc) or attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def _end_canary(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client().delete_registered_model_tag(MODEL_NAME, CANARY_TAG)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise
