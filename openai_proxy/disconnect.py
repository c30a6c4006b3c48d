"""Stop a request's work when its client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.requests import Request


@asynccontextmanager
async def cancel_on_disconnect(request: Request) -> AsyncIterator[None]:
    """Cancel the body of the `async with` when the client disconnects; execution resumes after it.

    Uvicorn keeps running a handler whose client has gone, so without this a completion (or the
    wait for a stream's first token) would go on generating in Triton for nobody. Once a streamed
    response has started, sse-starlette watches for the disconnect itself.
    """
    with anyio.CancelScope() as scope:
        async def watch() -> None:
            # The body has been read already: the next message is the disconnect.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            scope.cancel()

        watcher = asyncio.create_task(watch())
        try:
            yield
        finally:
            watcher.cancel()
