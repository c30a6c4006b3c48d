"""A streamed completion as Server-Sent Events, written straight to the connection.

Each payload goes out as one `data:` event in one ASGI message, from the task that reads the Triton
streams: no task or queue per stream between them. The generation is bounded by the request's deadline
and stops when the client goes away; a failure after the stream has started cannot change the HTTP
status any more, so it goes out as a last event holding an OpenAI error object.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from client.triton_vlm import GenerationChunk
from openai_proxy.disconnect import cancel_on_disconnect
from openai_proxy.errors import APIError, to_api_error
from openai_proxy.lifetimes import RequestLifetimes
from openai_proxy.metrics import ProxyMetrics
from openai_proxy.responses import ResponseFormat, closing_all, stream_payloads

HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
           (b"x-accel-buffering", b"no")]


def _event(payload: str) -> dict:
    return {"type": "http.response.body", "body": b"data: " + payload.encode() + b"\n\n", "more_body": True}


class EventStream(Response):
    """The response of a streamed completion: each choice's first chunk, then the rest."""

    media_type = "text/event-stream"

    def __init__(self, firsts: Sequence[GenerationChunk], rests: Sequence[AsyncIterator[GenerationChunk]],
                 fmt: ResponseFormat, include_usage: bool, lifetimes: RequestLifetimes, deadline: float,
                 metrics: ProxyMetrics) -> None:
        self.status_code, self.background = 200, None
        self.firsts, self.rests, self.fmt, self.include_usage = firsts, rests, fmt, include_usage
        self.lifetimes, self.deadline, self.metrics = lifetimes, deadline, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        # A client that goes away cancels the stream, which closes its Triton streams (and their requests).
        async with cancel_on_disconnect(receive), closing_all(self.rests):
            error: APIError | None = None
            with self.lifetimes.bounded(self.deadline) as lifetime:
                try:
                    payloads = stream_payloads(self.firsts, self.rests, self.fmt, self.include_usage)
                    async with aclosing(payloads):
                        async for payload in payloads:
                            await send(_event(payload))
                except Exception as exc:
                    error = to_api_error(exc)
            if lifetime.cut_off:
                error = self.lifetimes.expired(lifetime)
            if error is not None:
                self.metrics.stream_errors.labels(error.code or error.type).inc()
                await send(_event(json.dumps(error.body())))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
