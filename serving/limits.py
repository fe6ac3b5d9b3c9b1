"""Request limits in front of the endpoints (a body-size cap, no multipart bodies), and client errors
logged as what they are.

A pure ASGI middleware (BentoML's ``add_asgi_middleware``): it reads a POST body up to ``max_bytes``
before the app sees it, answers 413 beyond that (50 MB bodies used to be accepted), and 415 for
``multipart/*`` (every endpoint takes JSON; a multipart body without a boundary used to end in a 500
inside BentoML's form parser). Written by hand: Starlette has no body-size middleware, and this one
also has to cover chunked bodies that declare no length.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class RequestLimits:
    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_bytes: int = 65536):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if headers.get("content-type", "").lower().startswith("multipart/"):
            await _error(send, 415, "multipart bodies are not accepted: send application/json")
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _error(send, 413, f"request body of {declared} bytes is over the limit of {self.max_bytes}")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _error(send, 413, f"request body is over the limit of {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _error(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"error": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ClientErrorsAtInfo:
    """A logging filter for BentoML's request logger: a client's error (a validation error, or a
    ``BentoMLException`` under 500) is logged at INFO in one line, without a traceback. BentoML logs
    every one at ERROR with its traceback (2.5 MB of log for 2,000 fuzzed requests); server errors
    keep both."""

    def filter(self, record) -> bool:
        import logging

        from bentoml.exceptions import BentoMLException
        from pydantic import ValidationError

        exc = record.exc_info[1] if record.exc_info else None
        client_error = isinstance(exc, ValidationError) or (
            isinstance(exc, BentoMLException) and int(exc.error_code) < 500
        )
        if client_error:
            record.msg = f"{record.msg}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


def log_client_errors_at_info() -> None:
    """Install :class:`ClientErrorsAtInfo` on BentoML's request logger (once)."""
    import logging

    logger = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, ClientErrorsAtInfo) for f in logger.filters):
        logger.addFilter(ClientErrorsAtInfo())
