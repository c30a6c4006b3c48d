"""ASGI middleware that bounds what one client can ask of the proxy: body size and requests in flight."""

from __future__ import annotations

from collections.abc import Callable, Collection

from prometheus_client import Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openai_proxy.errors import APIError


class BodySizeLimit:
    """Answer 413 to a request body over `max_bytes`; smaller bodies are read here and handed on whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body is larger than the {self.max_bytes} byte limit",
                             code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large.response()(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # nobody to answer
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await too_large.response()(scope, receive, send)
            if not message.get("more_body", False):
                break

        replayed = False

        async def replay() -> Message:
            # The body once, then the client's own messages (the disconnect that handlers watch for).
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


class ConcurrencyLimit:
    """At most `max_in_flight` requests to `paths` at once (streams count until they end): 429 beyond.

    While the server drains for shutdown, new requests get 503. `gauge` shows the count.
    """

    def __init__(self, app: ASGIApp, paths: Collection[str], max_in_flight: int, draining: Callable[[], bool],
                 gauge: Gauge) -> None:
        self.app = app
        self.paths = paths
        self.max_in_flight = max_in_flight
        self.draining = draining
        self.gauge = gauge
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        if self.draining():
            error = APIError(503, "the server is shutting down", code="server_shutting_down")
            return await error.response()(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            error = APIError(429, f"the server is busy with {self.in_flight} requests; retry later",
                             code="server_busy", headers={"Retry-After": "1"})
            return await error.response()(scope, receive, send)
        self.in_flight += 1
        self.gauge.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.gauge.dec()
