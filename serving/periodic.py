"""A background loop of the service: a daemon thread that calls one function at an interval and
survives anything it raises, with the liveness ``/readyz`` reads.

The registry poll (``serving/models.py``), the user state's warehouse poll and its follower of the
other workers' logs (``serving/user_state.py``) run on it. Hand-written: the standard library's
``threading.Timer`` runs once, and a scheduler library would add a dependency to the lean serving
environment for twenty lines.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class PeriodicLoop:
    """Call ``step`` every ``seconds`` (first at once with ``immediately``, else after one interval)
    until :meth:`close`; an exception is logged, passed to ``on_error``, and the loop goes on.
    :meth:`start` after :meth:`close` starts it again."""

    def __init__(self, name: str, step: Callable[[], object], on_error: Callable[[Exception], None],
                 immediately: bool = False):  # fmt: skip
        self.name = name
        self.step = step
        self.on_error = on_error
        self.immediately = immediately
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        """Whether the loop runs (the service is not ready without it)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, seconds: float) -> None:
        self._stop.clear()

        def run() -> None:
            if not self.immediately and self._stop.wait(seconds):
                return
            while True:
                try:
                    self.step()
                except Exception as exc:  # a background loop survives anything: logged, reported, retried
                    log.warning("%s failed, retrying in %ss", self.name, seconds, exc_info=True)
                    self.on_error(exc)
                if self._stop.wait(seconds):
                    return

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
