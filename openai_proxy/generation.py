"""One generation for one HTTP request: deadline, client disconnect, and the answer as JSON or SSE."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from client.triton_vlm import GenerationChunk
from openai_proxy.disconnect import cancel_on_disconnect
from openai_proxy.lifetimes import RequestLifetimes
from openai_proxy.metrics import CLIENT_CLOSED_REQUEST, ProxyMetrics
from openai_proxy.responses import ResponseFormat, collect
from openai_proxy.streaming import sse_response

Start = Callable[[], Awaitable[AsyncIterator[GenerationChunk]]]


async def run_generation(request: Request, start: Start, fmt: ResponseFormat, stream: bool,
                         include_usage: bool) -> Response:
    """Await `start` (fetch media, open the Triton stream) and answer with what it generates.

    Everything up to the first chunk runs here, so that what fails early (a bad image, a prompt too
    long) is an HTTP error rather than an event in a 200 stream.
    """
    lifetimes: RequestLifetimes = request.app.state.lifetimes
    metrics: ProxyMetrics = request.app.state.metrics
    started = time.perf_counter()
    deadline = lifetimes.new_deadline()
    response = Response(status_code=CLIENT_CLOSED_REQUEST)  # stays if the client goes away; nobody reads it
    with lifetimes.bounded(deadline) as scope:
        async with cancel_on_disconnect(request):
            chunks = await start()
            first = await anext(chunks)
            metrics.time_to_first_token.labels(request.url.path).observe(time.perf_counter() - started)
            if stream:
                response = sse_response(first, chunks, fmt, include_usage, lifetimes, deadline, metrics)
            else:
                async with aclosing(chunks):
                    response = JSONResponse((await collect(first, chunks, fmt)).model_dump(mode="json"))
    if scope.cancelled_caught:
        raise lifetimes.expired(deadline)
    return response
