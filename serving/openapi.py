"""The service's OpenAPI document as the service really behaves (``GET /docs.json``).

BentoML generates the document from the endpoints' signatures, and gets five things wrong for this
service: every route answers "200" (``/feedback`` answers 202); the error body's ``detail`` is a
string (a validation error's is a list of ``{type, loc, msg}``); the 401 of the admin routes and the
413/415 of the request limits are missing; a body with required fields is optional; ``Optional``
fields come out as JSON Schema's ``anyOf [.., {type: null}]``, which an OpenAPI 3.0 reader does not
take for "nullable". A fuzzer built from that document could not produce one valid ``/feedback``.
:func:`contract` rewrites the generated document; :class:`OpenAPIContract` serves it in place of
BentoML's (hand-written: BentoML has no hook to amend its document).
``recsys_assets_tests/service/test_service_asgi.py`` fuzzes the service with schemathesis from this
document, in the test command: 0 server errors, 0 answers that break it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from serving.limits import Receive, Scope, Send

ERROR_BODY = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "What is wrong, naming the field and the value."},
        "detail": {
            "type": "array",
            "description": "Validation errors: one per field.",
            "items": {
                "type": "object",
                "properties": {"type": {"type": "string"}, "loc": {"type": "array"}, "msg": {"type": "string"}},
            },
        },
    },
}
CLIENT_ERRORS = {
    HTTPStatus.BAD_REQUEST: "a field is missing, of the wrong type or out of range: the body names it",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "the body is over the configured limit (RECSYS_MAX_BODY_BYTES)",
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: "a multipart body: every endpoint takes JSON",
}


def _response(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _nullable(node: Any) -> Any:
    """``anyOf: [X, {type: null}]`` → ``X`` with ``nullable: true`` (OpenAPI 3.0), everywhere."""
    if isinstance(node, list):
        return [_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    options = node.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options:
        rest = [o for o in options if o != {"type": "null"}]
        node.pop("anyOf")
        one = len(rest) == 1
        node = {**rest[0], **node, "nullable": True} if one else {**node, "anyOf": rest, "nullable": True}
    return node


def contract(spec: dict, *, accepted: set[str], admin: set[str], unavailable: dict[str, str]) -> dict:
    """BentoML's generated document, amended to what the routes answer.

    Args:
        accepted: routes that answer 202 rather than 200.
        admin: routes behind the bearer token (401 without it).
        unavailable: routes that answer 503, and when.
    """
    spec = _nullable(copy.deepcopy(spec))
    for path, item in spec["paths"].items():
        operation = item.get("post")
        if operation is None:
            continue
        body = operation.get("requestBody")
        if body is not None:  # a body with required fields is itself required (BentoML leaves it optional)
            schemas = [m.get("schema", {}) for m in body.get("content", {}).values()]
            refs = [spec["components"]["schemas"].get(s.get("$ref", "").rsplit("/", 1)[-1], s) for s in schemas]
            if any(r.get("required") for r in refs):
                body["required"] = True
        responses = operation["responses"]
        ok = responses.pop("200", None) or responses.pop(200, None)
        for code in [c for c in responses if str(c).startswith("4") or str(c).startswith("5")]:
            responses.pop(code)
        responses["202" if path in accepted else "200"] = {**ok, "description": "Accepted" if path in accepted
                                                           else ok.get("description", "OK")}  # fmt: skip
        for status, why in CLIENT_ERRORS.items():
            responses[str(status.value)] = _response(why, ERROR_BODY)
        if path in admin:
            responses["401"] = _response("no or a wrong 'Authorization: Bearer <token>'", ERROR_BODY)
            operation["security"] = [{"bearer": []}]
        if path in unavailable:
            responses["503"] = _response(unavailable[path], ERROR_BODY)
    spec.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "The admin token ($RECSYS_HOME/admin_token or RECSYS_ADMIN_TOKEN).",
    }
    return spec


class OpenAPIContract:
    """ASGI middleware: ``GET /docs.json`` answers the amended document (built once)."""

    def __init__(self, app, document: Callable[[], dict]) -> None:
        self.app = app
        self.document = document
        self._body: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/docs.json" or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        if self._body is None:
            self._body = json.dumps(self.document()).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(self._body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": self._body if scope["method"] == "GET" else b""})
