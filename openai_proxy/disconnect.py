"""Stop a request's work when its client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.types import Receive


@asynccontextmanager
async def cancel_on_disconnect(receive: Receive) -> AsyncIterator[None]:
    """Cancel the body of the `async with` when the client disconnects; execution resumes after it.

    Uvicorn keeps running a handler whose client has gone, and writes to a closed connection quietly, so
    without this a completion, a stream or the wait for a stream's first token would go on generating in
    Triton for nobody. The request's body has been read already: the next message is the disconnect.
    """
    with anyio.CancelScope() as scope:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            scope.cancel()

        watcher = asyncio.create_task(watch())
        try:
            yield
        finally:
            watcher.cancel()
