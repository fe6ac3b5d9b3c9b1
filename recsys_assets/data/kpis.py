"""Online KPIs per variant: from Prometheus when it runs, else from the feedback in the warehouse.

Both sources count the same events: impressions (recommended items served), clicks, conversions
(a ``play`` to the end after a recommendation: a rate per click, at most 1; a ``like`` follows a play
and would count the same item twice) and rejections (``skip``, ``dislike``). The PromQL behind each
number is in the README ("Online KPIs").
"""

from __future__ import annotations

from datetime import UTC, datetime

import httpx

from recsys_assets.data.warehouse import Warehouse
from recsys_assets.ml.canary import VariantStats

CONVERSIONS = ("play",)
REJECTIONS = ("skip", "dislike")


class PrometheusError(RuntimeError):
    """Prometheus cannot be queried; the message names the URL and the query."""


def _stats(variant: str, version: int | None, counts: dict[str, float]) -> VariantStats:
    return VariantStats(
        variant=variant,
        model_version=version,
        impressions=int(counts.get("impression", 0)),
        clicks=int(counts.get("click", 0)),
        conversions=int(sum(counts.get(t, 0) for t in CONVERSIONS)),
        rejections=int(sum(counts.get(t, 0) for t in REJECTIONS)),
    )


def kpis_from_warehouse(
    warehouse: Warehouse, since: datetime, versions: dict[str, int | None]
) -> dict[str, VariantStats]:
    """Per-variant counts of recommendation events since ``since`` for the given model versions."""
    rows = warehouse.fetch(
        "SELECT variant, model_version, event_type, COUNT(*) AS n FROM listening_events "
        "WHERE source = 'recommendation' AND played_at >= ? AND variant IS NOT NULL "
        "GROUP BY variant, model_version, event_type",
        [since],
    )
    out = {}
    for variant, version in versions.items():
        counts = {
            event_type: n
            for v, mv, event_type, n in rows.iter_rows()
            if v == variant and version is not None and mv == str(version)
        }
        out[variant] = _stats(variant, version, counts)
    return out


def prometheus_query(url: str, query: str) -> list[dict]:
    try:
        response = httpx.get(f"{url.rstrip('/')}/api/v1/query", params={"query": query}, timeout=10)
        response.raise_for_status()
        body = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise PrometheusError(f"Prometheus at {url} did not answer {query!r}: {exc}") from exc
    if body.get("status") != "success":
        raise PrometheusError(f"Prometheus at {url} refused {query!r}: {body.get('error')}")
    return body["data"]["result"]


def kpis_from_prometheus(url: str, since: datetime, versions: dict[str, int | None]) -> dict[str, VariantStats]:
    """The same counts from the service's counters scraped by Prometheus (``increase`` since ``since``)."""
    window = max(int((datetime.now(UTC) - since).total_seconds()), 60)
    impressions = prometheus_query(
        url, f"sum by (variant, model_version) (increase(recsys_impressions_total[{window}s]))"
    )
    feedback = prometheus_query(
        url, f"sum by (variant, model_version, event_type) (increase(recsys_feedback_total[{window}s]))"
    )
    out = {}
    for variant, version in versions.items():
        counts: dict[str, float] = {}
        for sample in impressions:
            m = sample["metric"]
            if m.get("variant") == variant and m.get("model_version") == str(version):
                counts["impression"] = counts.get("impression", 0) + float(sample["value"][1])
        for sample in feedback:
            m = sample["metric"]
            if m.get("variant") == variant and m.get("model_version") == str(version):
                counts[m["event_type"]] = counts.get(m["event_type"], 0) + float(sample["value"][1])
        out[variant] = _stats(variant, version, counts)
    return out
