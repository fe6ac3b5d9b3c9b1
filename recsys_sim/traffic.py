"""Simulated users calling the live endpoint, and reacting to what they get.

Each simulated user asks ``/recommend`` for a list and reacts to every item with the simulator's
behaviour model: a click with the world's true click probability; a clicked track is then played to
the end or skipped depending on the user's affinity, and sometimes liked; an item the user strongly
dislikes is sometimes explicitly rejected (``dislike``) without a click. Each reaction is sent to
``/feedback`` with the ``model_version`` and ``variant`` of the answer, so the canary analysis sees
per-variant CTR, conversion and rejection exactly as it would with real users.

Without a simulated world (imported data), clicks use a flat probability.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np

log = logging.getLogger(__name__)

FLAT_CLICK_PROBABILITY = 0.05


@dataclass
class TrafficReport:
    requests: int = 0
    failures: int = 0
    feedback: int = 0
    by_variant: dict[str, Counter] = field(default_factory=dict)
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def count(self, variant: str, key: str, n: int = 1) -> None:
        self.by_variant.setdefault(variant, Counter())[key] += n

    def ctr(self, variant: str) -> float:
        c = self.by_variant.get(variant, Counter())
        return c["click"] / c["impression"] if c["impression"] else 0.0

    def summary(self) -> str:
        rate = self.requests / max(self.seconds, 1e-9)
        parts = [
            f"{self.requests:,} requests in {self.seconds:.1f}s ({rate:,.0f}/s), "
            f"{self.failures} failed, {self.feedback:,} feedback events"
        ]
        for variant, c in sorted(self.by_variant.items()):
            parts.append(
                f"  {variant:<10} requests {c['request']:>7,}  impressions {c['impression']:>8,}  "
                f"CTR {self.ctr(variant):6.2%}  likes {c['like']:>6,}  plays {c['play']:>6,}  "
                f"skips {c['skip']:>6,}  dislikes {c['dislike']:>6,}"
            )
        return "\n".join(parts)


class Behaviour:
    """How a simulated user reacts to a recommended track."""

    def __init__(self, click_probability: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
                 affinity: Callable[[np.ndarray, np.ndarray], np.ndarray] | None, seed: int = 0):  # fmt: skip
        self.click_probability = click_probability
        self.affinity = affinity
        self.rng = np.random.default_rng(seed)

    def react(self, user_id: str, track_ids: list[str]) -> list[tuple[str, str]]:
        """The (track_id, event_type) reactions of ``user_id`` to a list."""
        if not track_ids:
            return []
        users = np.array([user_id] * len(track_ids), dtype=object)
        tracks = np.array(track_ids, dtype=object)
        if self.click_probability is not None:
            p_click = np.nan_to_num(self.click_probability(users, tracks), nan=FLAT_CLICK_PROBABILITY)
            affinity = np.nan_to_num(self.affinity(users, tracks), nan=0.0)
        else:
            p_click = np.full(len(tracks), FLAT_CLICK_PROBABILITY)
            affinity = np.zeros(len(tracks))
        reactions: list[tuple[str, str]] = []
        u = self.rng.random((len(tracks), 4))
        for i, track in enumerate(track_ids):
            if u[i, 0] < p_click[i]:
                reactions.append((track, "click"))
                completes = u[i, 1] < 1 / (1 + np.exp(-9 * (affinity[i] - 0.15)))
                reactions.append((track, "play" if completes else "skip"))
                if completes and u[i, 2] < 0.25 / (1 + np.exp(-6 * (affinity[i] - 0.4))):
                    reactions.append((track, "like"))
            elif affinity[i] < 0.0 and u[i, 3] < 0.03:
                reactions.append((track, "dislike"))
        return reactions


async def run_traffic(
    url: str,
    users: list[str],
    behaviour: Behaviour,
    *,
    rps: float,
    duration: float,
    k: int = 10,
    concurrency: int = 32,
    on_progress: Callable[[TrafficReport], None] | None = None,
) -> TrafficReport:
    """Call ``url``'s ``/recommend`` about ``rps`` times a second for ``duration`` seconds."""
    report = TrafficReport()
    rng = np.random.default_rng(1)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    started = time.monotonic()

    async def one(client: httpx.AsyncClient, user: str) -> None:
        async with semaphore:
            try:
                response = await client.post("/recommend", json={"user_id": user, "k": k})
            except httpx.HTTPError as exc:
                report.failures += 1
                report.errors[type(exc).__name__] += 1
                return
            report.requests += 1
            if response.status_code != 200:
                report.failures += 1
                report.errors[f"HTTP {response.status_code}"] += 1
                return
            body = response.json()
            report.count(body["variant"], "request")
            # Each item says which model recommended it (in an interleaved list, the team that picked it):
            # impressions and reactions are counted, and sent back, per item.
            items = {item["track_id"]: item for item in body["items"]}
            for item in body["items"]:
                report.count(item["variant"], "impression")
            for track, event_type in behaviour.react(user, list(items)):
                variant = items[track]["variant"]
                payload = {"user_id": user, "track_id": track, "event_type": event_type,
                           "model_version": items[track]["model_version"], "variant": variant}  # fmt: skip
                try:
                    sent = await client.post("/feedback", json=payload)
                except httpx.HTTPError as exc:
                    report.failures += 1
                    report.errors[type(exc).__name__] += 1
                    continue
                if sent.status_code == 202:
                    report.feedback += 1
                    report.count(variant, event_type)
                else:
                    report.failures += 1
                    report.errors[f"HTTP {sent.status_code} on feedback"] += 1

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10.0) as client:
        tasks: set[asyncio.Task] = set()
        sent = 0
        last_progress = started
        while (now := time.monotonic()) - started < duration:
            due = int((now - started) * rps)
            while sent < due:
                task = asyncio.create_task(one(client, users[int(rng.integers(len(users)))]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            if on_progress is not None and now - last_progress >= 5:
                report.seconds = now - started
                on_progress(report)
                last_progress = now
            await asyncio.sleep(0.005)
        if tasks:
            await asyncio.gather(*tasks)
    report.seconds = time.monotonic() - started
    return report
