"""A streamed completion as an SSE response, its generation bounded by the request's deadline.

The generation runs in its own task (sse-starlette's data sender) and hands payloads over through a
memory stream: a deadline can then cancel it cleanly, which a cancel scope spanning the `yield`s of
the body iterator could not do, and the stream still ends with an error event the client can read.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

import anyio
from sse_starlette import EventSourceResponse

from client.triton_vlm import GenerationChunk
from openai_proxy.errors import APIError, to_api_error
from openai_proxy.lifetimes import RequestLifetimes
from openai_proxy.metrics import ProxyMetrics
from openai_proxy.responses import ResponseFormat, closing_all, stream_payloads

# sse-starlette force-cancels streams this long after the drain starts; ours end (with an error event) first.
SHUTDOWN_MARGIN_S = 5.0


def sse_response(firsts: Sequence[GenerationChunk], rests: Sequence[AsyncIterator[GenerationChunk]],
                 fmt: ResponseFormat, include_usage: bool, lifetimes: RequestLifetimes, deadline: float,
                 metrics: ProxyMetrics) -> EventSourceResponse:
    """Stream each choice's first chunk and then the rest. A failure after the stream has started cannot
    change the HTTP status any more: it goes out as a last event holding an OpenAI error object, and the
    stream ends."""
    sender, receiver = anyio.create_memory_object_stream[str](math.inf)

    async def produce() -> None:
        error: APIError | None = None
        async with sender, closing_all(rests) as closing:
            payloads = await closing.enter_async_context(aclosing(stream_payloads(firsts, rests, fmt, include_usage)))
            with lifetimes.bounded(deadline) as lifetime:
                try:
                    async for payload in payloads:
                        await sender.send(payload)
                except Exception as exc:
                    error = to_api_error(exc)
            if lifetime.cut_off:
                error = lifetimes.expired(lifetime)
            if error is not None:
                metrics.stream_errors.labels(error.code or error.type).inc()
                await sender.send(json.dumps(error.body()))

    async def events() -> AsyncIterator[str]:
        async with receiver:
            async for payload in receiver:
                yield payload

    # Cancelling the sender's task (client gone, forced shutdown) closes the Triton stream in `rest`.
    return EventSourceResponse(events(), sep="\n", data_sender_callable=produce,
                               shutdown_grace_period=lifetimes.grace_s + SHUTDOWN_MARGIN_S)
