"""The one Prometheus client: the retrain sensor's alerts and the canary's serving health read through it."""

from __future__ import annotations

from dataclasses import dataclass

import httpx


class PrometheusError(RuntimeError):
    """Prometheus cannot be read; the message names the URL and what was asked."""


@dataclass(frozen=True)
class AlertEpisode:
    """One firing period of one alert: a retrain is requested once per episode."""

    name: str
    started_at: str

    @property
    def key(self) -> str:
        return f"{self.name}@{self.started_at}"


def firing_episodes(alerts: list[dict]) -> list[AlertEpisode]:
    """The firing alerts labelled ``retrain="true"`` of Prometheus's ``/api/v1/alerts`` answer."""
    return [
        AlertEpisode(alert["labels"]["alertname"], alert.get("activeAt", ""))
        for alert in alerts
        if alert.get("state") == "firing" and alert.get("labels", {}).get("retrain") == "true"
    ]


class PrometheusClient:
    """Prometheus's HTTP API at ``url``.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:9090``.
        timeout: seconds per request.
    """

    def __init__(self, url: str, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, what: str, params: dict | None = None) -> dict:
        try:
            response = httpx.get(f"{self.url}{path}", params=params, timeout=self.timeout)
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise PrometheusError(f"Prometheus at {self.url} did not answer {what}: {exc}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"Prometheus at {self.url} refused {what}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """The result vector of an instant query."""
        return self._get("/api/v1/query", repr(promql), {"query": promql})["result"]

    def retrain_episodes(self) -> list[AlertEpisode]:
        """The episodes of the firing alerts labelled ``retrain="true"``."""
        try:
            return firing_episodes(self._get("/api/v1/alerts", "its alerts")["alerts"])
        except KeyError as exc:
            raise PrometheusError(f"Prometheus at {self.url} answered alerts without {exc}") from exc
