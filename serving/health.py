"""``/readyz`` that says when the service is degraded, without taking it out of rotation.

BentoML answers ``/readyz`` with the service's ``__is_ready__``: 200 or 503, nothing in between. A
replica whose write-ahead log's disk is full still answers ``/recommend`` (its impressions are dropped
and counted): taking it out of rotation would put the log before the product, so it stays ready (200)
and the answer says why it is degraded (the body ``degraded: <reason>`` and the header
``x-recsys-degraded``), for a person or a probe that looks. Hand-written: BentoML's readiness has no
third state, and this is one header and one body on one route.
"""

from __future__ import annotations

from collections.abc import Callable

from serving.limits import Receive, Scope, Send

_DEGRADED: list[Callable[[], str | None]] = []  # the started service's "why degraded" (None: healthy)


def bind(degraded: Callable[[], str | None] | None) -> None:
    """Called by the service when it starts (its check) and stops (``None``)."""
    _DEGRADED.clear()
    if degraded is not None:
        _DEGRADED.append(degraded)


class DegradedReadiness:
    """ASGI middleware: a 200 from ``/readyz`` carries the reason the service is degraded, if it is."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reason = _DEGRADED[0]() if _DEGRADED else None
        if reason is None or scope["type"] != "http" or scope["path"] != "/readyz":
            await self.app(scope, receive, send)
            return
        body = f"degraded: {reason}\n".encode()
        held: dict = {}

        async def amend(message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] != 200:  # not ready: the 503 says so already
                    held["pass"] = True
                    await send(message)
                    return
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"content-length"]
                headers += [(b"content-length", str(len(body)).encode()), (b"x-recsys-degraded", b"1")]
                await send({**message, "headers": headers})
            elif held.get("pass"):
                await send(message)
            elif not message.get("more_body"):
                await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, amend)
