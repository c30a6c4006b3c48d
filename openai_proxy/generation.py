"""One generation for one HTTP request: deadline, client disconnect, and the answer as JSON or SSE."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from client.triton_vlm import GenerationChunk
from openai_proxy.disconnect import cancel_on_disconnect
from openai_proxy.lifetimes import RequestLifetimes
from openai_proxy.metrics import CLIENT_CLOSED_REQUEST, ProxyMetrics
from openai_proxy.responses import ResponseFormat, closing_all, collect
from openai_proxy.streaming import EventStream

# One stream per choice (n of them).
Start = Callable[[], Awaitable[Sequence[AsyncIterator[GenerationChunk]]]]


async def _first_chunks(streams: Sequence[AsyncIterator[GenerationChunk]]) -> list[GenerationChunk]:
    """The first chunk of every stream; if one fails, the others stop waiting (so that they can be closed)."""
    tasks = [asyncio.ensure_future(anext(chunks)) for chunks in streams]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def run_generation(request: Request, start: Start, fmt: ResponseFormat, stream: bool,
                         include_usage: bool) -> Response:
    """Await `start` (fetch media, open the Triton streams) and answer with what they generate.

    Everything up to the first chunk of every choice runs here, so that what fails early (a bad
    image, a prompt too long) is an HTTP error rather than an event in a 200 stream.
    """
    lifetimes: RequestLifetimes = request.app.state.lifetimes
    metrics: ProxyMetrics = request.app.state.metrics
    started = time.perf_counter()
    deadline = lifetimes.new_deadline()
    response = Response(status_code=CLIENT_CLOSED_REQUEST)  # stays if the client goes away; nobody reads it
    with lifetimes.bounded(deadline) as lifetime:
        async with cancel_on_disconnect(request.receive):
            streams = await start()
            async with closing_all(streams) as closing:  # closed here unless the SSE response takes them over
                firsts = await _first_chunks(streams)
                metrics.time_to_first_token.labels(request.url.path).observe(time.perf_counter() - started)
                if stream:
                    closing.pop_all()
                    response = EventStream(firsts, streams, fmt, include_usage, lifetimes, deadline, metrics)
                else:
                    response = JSONResponse((await collect(firsts, streams, fmt)).model_dump(mode="json"))
    if lifetime.cut_off:
        raise lifetimes.expired(lifetime)
    return response
