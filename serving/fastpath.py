"""``POST /recommend`` answered in one ASGI step, with BentoML's own input model and error format.

BentoML's request path (its Starlette routing, request object, serde lookup, IO-model construction,
context and response building) cost more per ``/recommend`` than the ranking itself
(``docs/benchmarks.md``, "Serving"). This middleware, the innermost of the service's, answers
``POST /recommend`` with a JSON body directly:

- the body is validated by the very model BentoML builds from the endpoint's signature
  (``Recommender.apis["recommend"].input_spec``), so the accepted inputs and the 400's body
  (``{"error": "N validation error for …", "detail": [{type, loc, msg}]}``) are BentoML's;
- the endpoint's own function runs (``recommend.local``: the service's code, metrics, canary routing
  and impressions, unchanged);
- a ``BentoMLException`` becomes its status and ``{"error": message}``, as BentoML answers it; any other
  exception a logged 500.

Anything else (other routes, other content types, the service not started yet) goes to BentoML.
Hand-written: BentoML has no lighter request path to switch to, and this is the part of it the
endpoint needs. ``RECSYS_FAST_PATH=0`` turns it off (``benchmarks/serving.py --steps`` measures both).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from bentoml.exceptions import BentoMLException
from pydantic import ValidationError

from serving.limits import Receive, Scope, Send

log = logging.getLogger("recsys.serving")
# Client errors are logged where BentoML logs them (at INFO, without a traceback: serving/limits.py).
requests_log = logging.getLogger("bentoml._internal.server.http_app")

_BOUND: dict[str, Callable[..., Awaitable[Any]]] = {}  # route → the started service's endpoint function
_JSON = (b"content-type", b"application/json")


def bind(route: str, function: Callable[..., Awaitable[Any]] | None) -> None:
    """Called by the service when it starts (the endpoint's function) and stops (``None``)."""
    if function is None:
        _BOUND.pop(route, None)
    else:
        _BOUND[route] = function


async def _answer(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [_JSON, (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class FastPath:
    """ASGI middleware for one JSON endpoint of the service (see the module's docstring)."""

    def __init__(self, app, service: Any, route: str = "/recommend", name: str = "recommend") -> None:
        self.app = app
        self.route = route
        self.input_model = service.apis[name].input_spec

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        function = _BOUND.get(self.route)
        if (
            function is None
            or scope["type"] != "http"
            or scope["path"] != self.route
            or scope["method"] != "POST"
            or not _is_json(scope)
        ):
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            data = self.input_model.model_validate_json(body or b"{}")
        except ValidationError as exc:
            detail = exc.errors(include_context=False, include_input=False, include_url=False)
            error = {"error": f"{exc.error_count()} validation error for {exc.title}", "detail": detail}
            requests_log.info("Exception on %s [POST]: ValidationError: %s", self.route, error["error"])
            await _answer(send, 400, json.dumps(error).encode())
            return
        try:
            result = await function(**{field: getattr(data, field) for field in type(data).model_fields})
        except BentoMLException as exc:
            requests_log.info("Exception on %s [POST]: %s: %s", self.route, type(exc).__name__, exc)
            await _answer(send, exc.error_code.value, json.dumps({"error": str(exc)}).encode())
            return
        except Exception:
            log.exception("%s failed", self.route)
            await _answer(send, 500, b'{"error":"Internal Server Error"}')
            return
        await _answer(send, 200, result.__pydantic_serializer__.to_json(result))


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";")[0].strip().lower() == b"application/json"
    return True  # BentoML reads a body without a content type as JSON too
