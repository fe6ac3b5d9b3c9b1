"""The request-limits middleware as a pure ASGI function: declared and undeclared (chunked) sizes."""

from __future__ import annotations

import asyncio

import pytest

from serving.limits import RequestLimits


def call(chunks: list[bytes], headers: dict[str, str], max_bytes: int = 100) -> tuple[int, bytes | None]:
    seen: dict = {}

    async def app(scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen["body"] = body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST",
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}  # fmt: skip
    asyncio.run(RequestLimits(app, max_bytes=max_bytes)(scope, receive, send))
    return sent[0]["status"], seen.get("body")


@pytest.mark.parametrize(
    ("chunks", "headers", "status", "body"),
    [
        ([b'{"a": 1}'], {"content-type": "application/json", "content-length": "8"}, 200, b'{"a": 1}'),
        ([b"x" * 60, b"y" * 30], {"content-type": "application/json"}, 200, b"x" * 60 + b"y" * 30),  # chunked
        ([b"x" * 60, b"y" * 60], {"content-type": "application/json"}, 413, None),  # chunked, over
        ([b"x"], {"content-type": "application/json", "content-length": "101"}, 413, None),  # declared, over
        ([b"--b"], {"content-type": "multipart/form-data"}, 415, None),
    ],
)
def test_limits(chunks: list[bytes], headers: dict[str, str], status: int, body: bytes | None) -> None:
    assert call(chunks, headers) == (status, body)
