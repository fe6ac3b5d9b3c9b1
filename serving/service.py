"""The recommendation service: champion and canary challenger, feedback loop, hot swap, metrics.

The canary's share of users and its mode (A/B or team-draft interleaving) are the registry's
(``recsys.canary`` on the registered model), read with the aliases at every poll, so every replica
serves the same split. The service only reads the registry: promotions, rollbacks and the canary
plan are the control plane's (``recsys model …``, the Dagster assets), and replicas follow them
within one poll (or at once on ``/admin/reload``).

    bentoml serve serving.service:Recommender --port 3001

Configuration (environment, read through ``recsys_core.settings``):

| variable | default | what |
|---|---|---|
| ``MLFLOW_TRACKING_URI`` | ``sqlite:///$RECSYS_HOME/mlflow/mlflow.db`` | where champion and challenger are |
| ``RECSYS_WAREHOUSE_URI`` | the DuckDB file | where impressions and feedback land (``none`` to disable) |
| ``RECSYS_FAULT_CHALLENGER_DELAY_MS`` | ``0`` | fault drill: extra latency on every challenger answer |
| ``RECSYS_MAX_BODY_BYTES`` | ``65536`` | larger request bodies get a 413; multipart bodies a 415 |
| ``RECSYS_MODEL_POLL_SECONDS`` | ``5`` | how often the registry's aliases are checked |
| ``RECSYS_FEEDBACK_FLUSH_SECONDS`` | ``2`` | how often buffered events land in the warehouse |
| ``RECSYS_BENTOML_METRICS`` | ``0`` | ``1``: BentoML's own metrics middleware as well (costly per request) |
| ``RECSYS_TRACE_REQUESTS`` | ``0`` | ``1``: OpenTelemetry spans for ``/recommend`` and ``/feedback`` too |
| ``RECSYS_HISTORY_POLL_SECONDS`` | ``10`` | how often the users' new plays are read from the warehouse |
| ``RECSYS_HISTORY_MAX_USERS`` | ``200000`` | users whose recent plays a worker holds (LRU) |
| ``RECSYS_ADMIN_TOKEN`` | the content of ``$RECSYS_HOME/admin_token`` | bearer token of the ``/admin/*`` endpoints |
"""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Annotated

import bentoml
import numpy as np
import prometheus_client
from annotated_types import Ge, Le
from bentoml.exceptions import BentoMLException, InvalidArgument, ServiceUnavailable
from pydantic import Field
from starlette.responses import JSONResponse

from recsys_core.contracts import POSITIVE_EVENT_TYPES
from recsys_core.registry import Registry
from recsys_core.scoring import single_threaded_blas
from recsys_core.settings import admin_token, load_settings
from recsys_core.warehouse import Warehouse
from serving import fastpath, health
from serving.canary import variant_for
from serving.fastpath import FastPath
from serving.feedback import FeedbackWriter, LogUnavailable, event_row
from serving.health import DegradedReadiness
from serving.interleaving import CHALLENGER_TEAM, team_draft
from serving.limits import RequestLimits, log_client_errors_at_info
from serving.metrics import RequestMetrics
from serving.models import ModelSlots
from serving.openapi import OpenAPIContract, contract
from serving.schemas import (
    FEEDBACK_TYPES,
    AdminResult,
    CanaryState,
    FeedbackAccepted,
    Item,
    ModelVersion,
    Recommendations,
    TrackId,
    UserId,
)
from serving.user_state import RecentPlays, SiblingFeedback, WarehousePoll

log = logging.getLogger("recsys.serving")

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

RECOMMENDATIONS = prometheus_client.Counter(
    name="recsys_recommendations", documentation="Recommendation lists served",
    labelnames=["model_version", "variant", "fallback"],
)  # fmt: skip
IMPRESSIONS = prometheus_client.Counter(
    name="recsys_impressions", documentation="Recommended items shown", labelnames=["model_version", "variant"]
)
FEEDBACK = prometheus_client.Counter(
    name="recsys_feedback", documentation="Feedback on recommended items",
    labelnames=["model_version", "variant", "event_type"],
)  # fmt: skip
SCORING_SECONDS = prometheus_client.Histogram(
    name="recsys_scoring_duration_seconds", documentation="Scoring and top-k time of /recommend",
    labelnames=["variant"], buckets=LATENCY_BUCKETS,
)  # fmt: skip
REQUEST_SECONDS = prometheus_client.Histogram(
    name="recsys_request_duration_seconds",
    documentation="/recommend handling time per variant (the canary's latency guardrail)",
    labelnames=["variant", "model_version"], buckets=LATENCY_BUCKETS,
)  # fmt: skip
REQUEST_ERRORS = prometheus_client.Counter(
    name="recsys_request_errors", documentation="/recommend requests that failed while ranking, per variant",
    labelnames=["variant", "model_version"],
)  # fmt: skip
MODEL_RELOADS = prometheus_client.Counter(
    name="recsys_model_reloads", documentation="Model swaps", labelnames=["variant", "reason"]
)
MODEL_LOAD_FAILURES = prometheus_client.Counter(
    name="recsys_model_load_failures", documentation="Versions that could not be loaded (the current one stays)",
    labelnames=["variant"],
)  # fmt: skip
FEEDBACK_BACKLOG = prometheus_client.Gauge(
    name="recsys_feedback_backlog_events",
    documentation="Events acknowledged or buffered and not landed in the warehouse yet, at the last flush "
    "(a served list's impressions count as one)",
    multiprocess_mode="livesum",
)
IMPRESSIONS_DROPPED = prometheus_client.Counter(
    name="recsys_impressions_dropped",
    documentation="Impressions of served lists that the write-ahead log could not take (its disk is full): "
    "the lists were served, the impressions are lost",
)
FEEDBACK_REFUSED = prometheus_client.Counter(
    name="recsys_feedback_refused",
    documentation="/feedback calls answered 503 because the write-ahead log could not take them (nothing "
    "acknowledged); the client retries",
)
LANDER_RESTARTS = prometheus_client.Counter(
    name="recsys_feedback_lander_restarts",
    documentation="Feedback landers (the child process landing the write-ahead log) that died and were restarted",
)
USER_STATE_USERS = prometheus_client.Gauge(
    name="recsys_user_state_users", documentation="Users whose plays since the model's cutoff a worker holds",
    multiprocess_mode="livesum",
)  # fmt: skip
USER_STATE_EVICTIONS = prometheus_client.Counter(
    name="recsys_user_state_evictions", documentation="Users dropped from the user state (its size cap)"
)
USER_STATE_POLL_FAILURES = prometheus_client.Counter(
    name="recsys_user_state_poll_failures",
    documentation="Reads of the user state's sources (the warehouse, the other workers' logs) that failed (retried)",
)
MODEL_INFO = prometheus_client.Gauge(
    name="recsys_model_version", documentation="Version served per variant (0: none)", labelnames=["variant"]
)


FEEDBACK_RETRY_AFTER_SECONDS = 5  # a full log's disk: the lander frees space as it lands

# The routes of the contract, timed by serving.metrics (every other path is labelled "other").
ENDPOINTS = ("/recommend", "/feedback", "/admin/canary", "/admin/reload")
KNOBS = load_settings().serving


@bentoml.service(
    name="recommender",
    traffic={"timeout": 10},
    # Two workers by default: a worker that dies (kill -9, OOM) leaves the other accepting on the shared
    # socket while the arbiter respawns it (docs/reliability.md). Each worker follows the registry itself.
    workers=KNOBS.workers,
    logging={"access": {"enabled": KNOBS.access_log}},
    # BentoML's own metrics middleware costs more per request than the endpoint does (docs/benchmarks.md,
    # "Serving"): serving.metrics serves /metrics and times the requests instead.
    metrics={"enabled": KNOBS.bentoml_metrics},
    # The OpenTelemetry middleware is always installed; with no exporter configured it would still
    # build a span per request. The hot paths are left out unless asked (matched against the full URL).
    tracing={"excluded_urls": [] if KNOBS.trace_requests else [f"{e}$" for e in ENDPOINTS[:2]]},
)
class Recommender:
    """Real-time recommendations from the MLflow registry's champion, with a canary challenger."""

    def __init__(self) -> None:
        log_client_errors_at_info()
        single_threaded_blas()
        settings = load_settings()
        knobs = settings.serving
        root = settings.mlflow_artifact_root
        self.registry = Registry(settings.mlflow_tracking_uri, root, settings.home / "models" / "serving")
        self.fault_delay = knobs.fault_delay_seconds
        self.rng = np.random.default_rng()  # the team-draft coin flips
        self._children: dict[tuple, object] = {}
        self.token = admin_token(settings.home)
        self.slots = ModelSlots(
            self.registry,
            on_swap=self._swapped,
            on_load_failure=lambda variant, _version: MODEL_LOAD_FAILURES.labels(variant=variant).inc(),
            ann_min_items=settings.ann_min_items,
        )
        self.slots.refresh(reason="start-up")
        self.slots.start(knobs.model_poll_seconds)
        warehouse = Warehouse(settings.warehouse_uri) if knobs.warehouse_enabled else None
        self.feedback_writer = FeedbackWriter(
            warehouse,
            spill_dir=settings.feedback_log_dir,
            flush_seconds=knobs.feedback_flush_seconds,
            on_backlog=FEEDBACK_BACKLOG.set,
            lander=True,  # landing in a child process: its pauses stay out of this one's requests
            on_lander_restart=LANDER_RESTARTS.inc,
            on_impressions_dropped=IMPRESSIONS_DROPPED.inc,
        )
        self.feedback_writer.start()
        # The users' plays since the champion's cutoff: /feedback's and the warehouse's (serving/user_state.py).
        self.recent = RecentPlays(knobs.history_max_users, on_evict=USER_STATE_EVICTIONS.inc)
        # What the other workers of this service acknowledged, from their write-ahead logs (a fraction of a second).
        self.siblings = SiblingFeedback(self.feedback_writer.spill_dir, self.recent,
                                        on_failure=USER_STATE_POLL_FAILURES.inc)  # fmt: skip
        self.siblings.start()
        self.user_poll = None
        if warehouse is not None:
            self.user_poll = WarehousePoll(
                warehouse, self.recent, cutoff=self._champion_cutoff,
                on_poll=lambda _added: USER_STATE_USERS.set(len(self.recent)),
                on_failure=USER_STATE_POLL_FAILURES.inc,
            )  # fmt: skip
            self.user_poll.start(knobs.history_poll_seconds)
        if knobs.fast_path:
            fastpath.bind("/recommend", self.recommend.local)
        health.bind(self._degraded)
        # Everything loaded so far (the libraries, the models) lives as long as the process: out of the
        # collector's generations, so that a full collection does not walk it while requests wait.
        gc.freeze()

    def _swapped(self, variant: str, old: int | None, new: int | None, reason: str) -> None:
        MODEL_RELOADS.labels(variant=variant, reason=reason).inc()
        MODEL_INFO.labels(variant=variant).set(new or 0)

    def _champion_cutoff(self) -> datetime | None:
        champion = self.slots.current.champion
        cutoff = champion.artifact.cutoff if champion is not None else None
        return datetime.fromisoformat(cutoff) if cutoff else None

    def _degraded(self) -> str | None:
        """Why this replica serves in a degraded way (``/readyz`` says it, still 200), or ``None``."""
        error = self.feedback_writer.log_error
        if error is None:
            return None
        return (f"the write-ahead log refuses writes ({error}): lists are served without their impressions "
                "and /feedback answers 503")  # fmt: skip

    def __is_ready__(self) -> bool:
        """``/readyz``: not ready once a background loop (registry poll, feedback landing, the user
        state's warehouse poll and sibling follower) has stopped."""
        return (
            self.slots.alive
            and self.feedback_writer.alive
            and self.siblings.alive
            and (self.user_poll is None or self.user_poll.alive)
        )

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        fastpath.bind("/recommend", None)
        health.bind(None)
        self.slots.close()
        self.siblings.close()
        if self.user_poll is not None:
            self.user_poll.close()
        self.feedback_writer.close()
        gc.unfreeze()  # let the interpreter's exit free what start-up froze

    # --- the contract --------------------------------------------------------------------------

    @bentoml.api(route="/recommend")
    async def recommend(
        self, user_id: UserId, k: Annotated[int, Field(strict=True), Ge(1), Le(100)] = 10
    ) -> Recommendations:
        """Top-k tracks for a user, already-heard tracks excluded, from their plays up to now (a
        history-aware model); popular tracks for users with no play the model knows."""
        slots = self.slots.current  # read once: a swap during this request does not affect it
        if slots.champion is None:
            raise ServiceUnavailable("no champion model is registered yet")
        variant = variant_for(user_id, slots.fraction, slots.challenger is not None)
        interleaved = variant == "challenger" and slots.mode == "interleaving"
        if interleaved:
            variant = "interleaved"
        ranker = slots.champion if variant == "champion" else slots.challenger
        version = str(ranker.version)
        recent = self.recent.get(user_id)
        started = time.perf_counter()
        try:
            rec = ranker.recommend(user_id, k, recent)
            if interleaved:
                items = self._interleave(slots.champion.recommend(user_id, k, recent), slots.champion.version, rec,
                                         ranker.version, k)  # fmt: skip
            else:
                items = [
                    Item.model_construct(track_id=t, artist_id=a, score=s, model_version=ranker.version,
                                         variant=variant)
                    for t, a, s in zip(rec.track_ids, rec.artist_ids, rec.scores, strict=True)
                ]  # fmt: skip
            SCORING_SECONDS.labels(variant=variant).observe(time.perf_counter() - started)
            if variant != "champion" and self.fault_delay:
                await asyncio.sleep(self.fault_delay)
        except Exception:
            REQUEST_ERRORS.labels(variant=variant, model_version=version).inc()
            raise
        finally:
            REQUEST_SECONDS.labels(variant=variant, model_version=version).observe(time.perf_counter() - started)
        request_id = uuid.uuid4().hex
        self._count(RECOMMENDATIONS, version, variant, str(rec.fallback).lower())
        shown = Counter((item.model_version, item.variant) for item in items)
        for (item_version, item_variant), n in shown.items():
            self._count(IMPRESSIONS, str(item_version), item_variant, n=n)
        at = datetime.now(UTC)
        # In the log before the answer (a kill -9 of this worker loses none), synced in batches.
        self.feedback_writer.append_impressions(
            request_id, user_id, at, [(i.track_id, i.artist_id, i.model_version, i.variant) for i in items]
        )
        # model_construct: the fields are ours and already typed; validating them again per request
        # cost more than the ranking (profile in docs/benchmarks.md). The response is still
        # serialised against the declared model, so the OpenAPI schema is what is sent.
        return Recommendations.model_construct(
            user_id=user_id,
            items=items,
            model_version=ranker.version,
            variant=variant,
            fallback=rec.fallback,
            personalised_from_history=rec.personalised_from_history,
            request_id=request_id,
        )

    def _count(self, metric, version: str, variant: str, fallback: str | None = None, n: int = 1) -> None:
        """``metric.labels(…).inc(n)`` through a cache of label children (``labels()`` locks and hashes)."""
        key = (metric, version, variant, fallback)
        child = self._children.get(key)
        if child is None:
            labels = {"model_version": version, "variant": variant}
            if fallback is not None:
                labels["fallback"] = fallback
            child = self._children[key] = metric.labels(**labels)
        child.inc(n)

    def _interleave(self, champion, champion_version: int, challenger, challenger_version: int, k: int) -> list[Item]:
        """Team draft of the two lists, each item credited to the model that picked it."""
        lists = (champion, challenger)
        versions = (champion_version, challenger_version)
        return [
            Item.model_construct(track_id=lists[team].track_ids[i], artist_id=lists[team].artist_ids[i],
                                 score=lists[team].scores[i], model_version=versions[team],
                                 variant="challenger" if team == CHALLENGER_TEAM else "champion")
            for team, i in team_draft(champion.track_ids, challenger.track_ids, k, self.rng)
        ]  # fmt: skip

    @bentoml.api(route="/feedback")
    async def feedback(
        self,
        user_id: UserId,
        track_id: TrackId,
        # Checked below rather than as a Literal, so that the 400 names the value too; the enum is
        # still in the OpenAPI document.
        event_type: Annotated[str, Field(description="What the user did.", json_schema_extra={"enum": FEEDBACK_TYPES})],
        model_version: ModelVersion | None = None,
        variant: Annotated[str | None, Field(json_schema_extra={"enum": ["champion", "challenger"]})] = None,
        event_id: Annotated[str | None, Field(max_length=128)] = None,
        ctx: bentoml.Context = None,
    ) -> FeedbackAccepted:
        """Record what the user did with a recommended track (202 Accepted)."""
        if event_type not in FEEDBACK_TYPES:
            raise InvalidArgument(f"event_type={event_type!r}: expected one of {', '.join(FEEDBACK_TYPES)}")
        if variant is not None and variant not in ("champion", "challenger"):
            raise InvalidArgument(f"variant={variant!r}: expected champion or challenger")
        event_id = event_id or f"fb-{uuid.uuid4().hex}"
        row = event_row(
            event_id=event_id,
            user_id=user_id,
            track_id=track_id,
            artist_id=None,
            event_type=event_type,
            model_version=model_version,
            variant=variant,
        )
        # Durable before it is acknowledged: the write-ahead log, fsync-ed off the event loop. A log that
        # cannot take it (a full disk) acknowledges nothing: 503 and when to retry, never a 500.
        try:
            await asyncio.to_thread(self.feedback_writer.log, [row])
        except LogUnavailable as exc:
            FEEDBACK_REFUSED.inc()
            log.warning("/feedback refused: %s", exc)
            error = f"{exc}: nothing was recorded; retry later (with the same event_id, to count it once)"
            if ctx is not None:  # BentoML sets the answer's status and headers from the context
                ctx.response.status_code = HTTPStatus.SERVICE_UNAVAILABLE
                ctx.response.headers["Retry-After"] = str(FEEDBACK_RETRY_AFTER_SECONDS)
            return JSONResponse({"error": error}, status_code=HTTPStatus.SERVICE_UNAVAILABLE,
                                headers={"Retry-After": str(FEEDBACK_RETRY_AFTER_SECONDS)})  # fmt: skip
        if event_type in POSITIVE_EVENT_TYPES:  # the user's next list follows what they just liked or played
            self.recent.add(user_id, (track_id,))
        FEEDBACK.labels(
            model_version=self._version_label(model_version),
            variant=variant or "unknown",
            event_type=event_type,
        ).inc()
        if ctx is not None:
            ctx.response.status_code = HTTPStatus.ACCEPTED
        return FeedbackAccepted(accepted=True, event_id=event_id)

    def _version_label(self, model_version: int | None) -> str:
        """The metric label of a client-sent version: the served versions by number, anything else
        ``other`` (unauthenticated input must not grow the number of series)."""
        if model_version is None:
            return "unknown"
        slots = self.slots.current
        return str(model_version) if model_version in (slots.champion_version, slots.challenger_version) else "other"

    # --- administration (bearer token) ------------------------------------------------------------

    def _authorize(self, ctx: bentoml.Context) -> None:
        header = ctx.request.headers.get("authorization", "")
        # Compared as bytes: a non-ASCII header made compare_digest raise TypeError (a 500).
        given = header.encode("utf-8", "surrogateescape")
        if not secrets.compare_digest(given, f"Bearer {self.token}".encode()):
            raise BentoMLException(
                "admin endpoints need 'Authorization: Bearer <token>'", error_code=HTTPStatus.UNAUTHORIZED
            )

    def _result(self, detail: str) -> AdminResult:
        slots = self.slots.current
        return AdminResult(ok=True, detail=detail, champion_version=slots.champion_version,
                           challenger_version=slots.challenger_version)  # fmt: skip

    @bentoml.api(route="/admin/canary")
    async def canary(self, ctx: bentoml.Context) -> CanaryState:
        """The canary plan this replica serves (the registry's; set it with ``recsys model canary``)."""
        self._authorize(ctx)
        slots = self.slots.current
        canary = slots.registry.canary
        return CanaryState(
            fraction=slots.fraction, mode=slots.mode, step=canary.step if canary else None,
            champion_version=slots.champion_version, challenger_version=slots.challenger_version,
        )  # fmt: skip

    @bentoml.api(route="/admin/reload")
    def reload(self, ctx: bentoml.Context) -> AdminResult:
        """Follow the registry's aliases now instead of at the next poll."""
        self._authorize(ctx)
        swapped = self.slots.refresh(reason="admin reload")
        if self.slots.last_error:
            raise ServiceUnavailable(f"reload failed: {self.slots.last_error}")
        return self._result("swapped" if swapped else "already up to date")


UNAVAILABLE = {  # the routes that answer 503, and when (the OpenAPI document says it)
    "/recommend": "no champion model is loaded yet",
    "/admin/reload": "no champion model is loaded yet",
    "/feedback": "the write-ahead log cannot take the event (its disk is full): nothing was recorded; retry after "
    "the Retry-After header's seconds",
}
# The first added is the outer one: the request metrics time the limits' 413 and 415 answers too.
Recommender.add_asgi_middleware(
    OpenAPIContract,
    document=lambda: contract(Recommender.openapi_spec.asdict(), accepted={"/feedback"},
                              admin={"/admin/canary", "/admin/reload"}, unavailable=UNAVAILABLE),
)  # fmt: skip
Recommender.add_asgi_middleware(RequestMetrics, endpoints=ENDPOINTS)
Recommender.add_asgi_middleware(DegradedReadiness)
Recommender.add_asgi_middleware(RequestLimits, max_bytes=KNOBS.max_body_bytes)
# The innermost: /recommend in one ASGI step (serving/fastpath.py), after the limits and inside the metrics.
Recommender.add_asgi_middleware(FastPath, service=Recommender)
