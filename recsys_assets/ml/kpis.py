"""Online KPIs of the canary: user-level feedback from the warehouse, serving health from Prometheus
or the service.

- :func:`canary_events` and :func:`canary_strata`: per-user sums by traffic step and variant (or
  interleaving team), from the feedback in the warehouse: the user-level test needs users, which no
  metric label may carry.
- :func:`serving_health`: each variant's ``/recommend`` requests, errors and latency p99, for the
  guardrails, from Prometheus (every replica) when it runs, else from the service's ``/metrics``.

The events counted: impressions (recommended items served), clicks, conversions (a ``play`` to the
end after a recommendation: a rate per click, at most 1; a ``like`` follows a play and would count
the same item twice) and rejections (``skip``, ``dislike``). The PromQL behind each number is in the
README ("Online KPIs").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import polars as pl

from recsys_assets.ml.canary import INTERLEAVING, Arm, ServingHealth, Stratum
from recsys_assets.ml.prometheus import PrometheusClient, PrometheusError
from recsys_core.registry import CanaryState
from recsys_core.warehouse import Warehouse

log = logging.getLogger(__name__)

CONVERSIONS = ("play",)
REJECTIONS = ("skip", "dislike")


# --- the canary's user-level data and serving health -------------------------------------------

_SUMS = {
    "impressions": pl.col("event_type") == "impression",
    "clicks": pl.col("event_type") == "click",
    "conversions": pl.col("event_type").is_in(CONVERSIONS),
    "rejections": pl.col("event_type").is_in(REJECTIONS),
}


def canary_events(warehouse: Warehouse, canary: CanaryState, champion: int) -> pl.DataFrame:
    """Per (step, variant, user) sums of the canary's recommendation events since its first step.

    An event belongs to the step that had started when it was played; its variant is the one the
    service recorded (in an interleaved list, the team of the item).
    """
    starts = canary.step_starts()
    rows = warehouse.fetch(
        "SELECT user_id, variant, event_type, played_at FROM listening_events "
        "WHERE source = 'recommendation' AND played_at >= ? AND variant IN ('champion', 'challenger') "
        "AND ((variant = 'champion' AND model_version = ?) OR (variant = 'challenger' AND model_version = ?))",
        [starts[0][2], str(champion), str(canary.version)],
    )
    schema = {"step": pl.Int64, "variant": pl.String, "user_id": pl.String, **dict.fromkeys(_SUMS, pl.Float64)}
    if rows.is_empty():
        return pl.DataFrame(schema=schema)
    steps = pl.DataFrame(
        {"step": [s for s, _, _ in starts], "step_start": [at for _, _, at in starts]},
        schema={"step": pl.Int64, "step_start": rows.schema["played_at"]},
    ).sort("step_start")
    return (
        rows.sort("played_at")
        .join_asof(steps, left_on="played_at", right_on="step_start", strategy="backward")
        .group_by("step", "variant", "user_id")
        .agg(**{name: condition.sum().cast(pl.Float64) for name, condition in _SUMS.items()})
        .sort("step", "variant", "user_id")
        .select(list(schema))
    )


def _arm(frame: pl.DataFrame) -> Arm:
    return Arm(*(frame[name].to_numpy() for name in _SUMS))


def canary_strata(events: pl.DataFrame, canary: CanaryState) -> list[Stratum]:
    """The strata of :func:`recsys_assets.ml.canary.decide_canary`, one per step so far.

    A/B: the users of each variant in that step. Interleaving: the users who got interleaved lists in
    that step (those with challenger-team impressions), the champion team's sums aligned to them.
    """
    strata = []
    for step, fraction, _ in canary.step_starts():
        in_step = events.filter(pl.col("step") == step)
        champion = in_step.filter(pl.col("variant") == "champion").drop("step", "variant")
        challenger = in_step.filter(pl.col("variant") == "challenger").drop("step", "variant")
        if canary.mode == INTERLEAVING:
            users = challenger.select("user_id")
            champion = users.join(champion, on="user_id", how="left").fill_null(0.0)
            strata.append(Stratum(step, fraction, _arm(champion), _arm(challenger), paired=True))
        else:
            strata.append(Stratum(step, fraction, _arm(champion), _arm(challenger)))
    return strata


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's ``histogram_quantile`` over cumulative ``(upper bound, count)`` buckets: linear
    interpolation inside the bucket that holds the quantile (the same estimate Prometheus gives, so
    both sources of the guardrail agree)."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if np.isinf(bound):
                return lower_bound  # Prometheus returns the highest finite bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def _challenger_variants(mode: str) -> tuple[str, ...]:
    return ("interleaved",) if mode == INTERLEAVING else ("challenger",)


def serving_health_from_metrics(text: str, versions: dict[str, int], mode: str) -> dict[str, ServingHealth]:
    """Each variant's health from one service's own ``/metrics`` (cumulative since it started)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"champion": ("champion",), "challenger": _challenger_variants(mode)}
    buckets: dict[str, dict[float, float]] = {v: {} for v in wanted}
    requests = dict.fromkeys(wanted, 0.0)
    errors = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            for variant, names in wanted.items():
                if labels.get("variant") in names and labels.get("model_version") == str(versions[variant]):
                    if sample.name == "recsys_request_duration_seconds_bucket":
                        le = float(labels["le"])
                        buckets[variant][le] = buckets[variant].get(le, 0.0) + sample.value
                    elif sample.name == "recsys_request_duration_seconds_count":
                        requests[variant] += sample.value
                    elif sample.name == "recsys_request_errors_total":
                        errors[variant] += sample.value
    return {
        v: ServingHealth(int(requests[v]), int(errors[v]), histogram_quantile(0.99, list(buckets[v].items())))
        for v in wanted
    }


def serving_health_from_prometheus(
    url: str, since: datetime, versions: dict[str, int], mode: str
) -> dict[str, ServingHealth]:
    """The same from Prometheus, over every replica, since ``since``."""
    window = max(int((datetime.now(UTC) - since).total_seconds()), 60)
    prometheus = PrometheusClient(url)
    out = {}
    for variant, names in {"champion": ("champion",), "challenger": _challenger_variants(mode)}.items():
        selector = f'variant=~"{"|".join(names)}",model_version="{versions[variant]}"'
        buckets = f"increase(recsys_request_duration_seconds_bucket{{{selector}}}[{window}s])"
        p99 = prometheus.query(f"histogram_quantile(0.99, sum by (le) ({buckets}))")
        count = prometheus.query(f"sum(increase(recsys_request_duration_seconds_count{{{selector}}}[{window}s]))")
        failed = prometheus.query(f"sum(increase(recsys_request_errors_total{{{selector}}}[{window}s]))")

        def value(result: list[dict]) -> float | None:
            v = float(result[0]["value"][1]) if result else None
            return None if v is None or np.isnan(v) else v

        out[variant] = ServingHealth(int(value(count) or 0), int(value(failed) or 0), value(p99))
    return out


def serving_health(
    prometheus_url: str | None, fetch_metrics: Callable[[], str], since: datetime, versions: dict[str, int], mode: str
) -> tuple[dict[str, ServingHealth] | None, str]:
    """Each variant's serving health and where it came from: Prometheus (every replica) when it is set
    and answers, else the service's own ``/metrics`` (``fetch_metrics``, raising ``OSError`` when the
    service does not answer), else ``None``."""
    if prometheus_url:
        try:
            return serving_health_from_prometheus(prometheus_url, since, versions, mode), f"Prometheus {prometheus_url}"
        except PrometheusError as exc:
            log.warning("%s; reading the service's /metrics instead", exc)
    try:
        return serving_health_from_metrics(fetch_metrics(), versions, mode), "the service's /metrics"
    except OSError as exc:
        log.warning("no serving health: the service's /metrics did not answer (%s)", exc)
        return None, "unavailable"
