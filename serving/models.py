"""The champion and challenger the service serves, and how they are swapped without a restart.

:class:`ModelSlots` holds the two rankers behind one immutable :class:`Slots` value. A refresh reads
the registry's aliases; for each alias that now points elsewhere it downloads the version, loads it,
runs a smoke query, and only then replaces the whole ``Slots`` value in one assignment. A request
reads ``self.current`` once and uses that value throughout, so it never sees half a swap, and the old
rankers are released when the last request holding them finishes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from recsys_core.ann import DEFAULT_MIN_ITEMS
from recsys_core.registry import Registry, RegistryError, ServingState
from recsys_core.scoring import Ranker
from serving.periodic import PeriodicLoop

log = logging.getLogger(__name__)


NOTHING_REGISTERED = ServingState(None, None, None)


@dataclass(frozen=True)
class Slots:
    champion: Ranker | None
    challenger: Ranker | None
    registry: ServingState = NOTHING_REGISTERED  # the aliases and canary plan they follow

    @property
    def fraction(self) -> float:
        """The share of users who get the challenger now (the registry's canary plan, once the
        challenger it names is loaded)."""
        if self.challenger is None or self.challenger.version != self.registry.challenger:
            return 0.0
        return self.registry.fraction

    @property
    def mode(self) -> str:
        return self.registry.mode

    @property
    def champion_version(self) -> int | None:
        return self.champion.version if self.champion else None

    @property
    def challenger_version(self) -> int | None:
        return self.challenger.version if self.challenger else None


class ModelSlots:
    """Champion and challenger, loaded from the registry and hot-swapped.

    Args:
        registry: where the aliases and versions are.
        on_swap: called with (variant, old version, new version, reason) after each swap.
    """

    def __init__(
        self,
        registry: Registry,
        on_swap: Callable[[str, int | None, int | None, str], None] | None = None,
        on_load_failure: Callable[[str, int], None] | None = None,
        ann_min_items: int = DEFAULT_MIN_ITEMS,
    ):
        self.registry = registry
        self.ann_min_items = ann_min_items
        self.on_swap = on_swap
        self.on_load_failure = on_load_failure
        self.load_failures = 0
        self.current = Slots(None, None)
        self._lock = threading.Lock()  # one refresh at a time; requests never take it
        self._loop = PeriodicLoop("registry poll", self.refresh, on_error=self._poll_failed)
        self.last_error: str | None = None

    def _load(self, version: int) -> Ranker:
        path: Path = self.registry.download(version)
        ranker = Ranker.load(path, version, ann_min_items=self.ann_min_items)
        ranker.smoke_test()
        return ranker

    def refresh(self, reason: str = "registry poll") -> bool:
        """Follow the registry's aliases; return whether anything was swapped."""
        with self._lock:
            try:
                state = self.registry.serving_state()
            except RegistryError as exc:
                self.last_error = str(exc)
                log.warning("cannot read the registry, keeping the current models: %s", exc)
                return False
            current = self.current
            wanted = {"champion": state.champion, "challenger": state.challenger}
            new = replace(current, registry=state)
            swapped = []
            for variant, version in wanted.items():
                loaded = getattr(current, variant)
                if (loaded.version if loaded else None) == version:
                    continue
                if version is None:
                    new = replace(new, **{variant: None})
                else:
                    reuse = [r for r in (current.champion, current.challenger) if r and r.version == version]
                    try:
                        ranker = reuse[0] if reuse else self._load(version)
                    except Exception as exc:  # any broken version (IndexError, StopIteration…): keep the current one
                        self.last_error = f"version {version} for {variant}: {type(exc).__name__}: {exc}"
                        self.load_failures += 1
                        log.exception("not swapping %s to version %s", variant, version)
                        if self.on_load_failure is not None:
                            self.on_load_failure(variant, version)
                        continue
                    new = replace(new, **{variant: ranker})
                swapped.append((variant, loaded.version if loaded else None, version))
            self.current = new  # the atomic swap (the canary plan may have moved without a model swap)
            if not swapped:
                return False
            self.last_error = None
        for variant, old, version in swapped:
            log.info("%s: version %s -> %s (%s)", variant, old, version, reason)
            if self.on_swap is not None:
                self.on_swap(variant, old, version, reason)
        return True

    def _poll_failed(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"

    @property
    def alive(self) -> bool:
        """Whether the poll loop runs (the service is not ready without it)."""
        return self._loop.alive

    def start(self, poll_seconds: float) -> None:
        self._loop.start(poll_seconds)

    def close(self) -> None:
        self._loop.close()
