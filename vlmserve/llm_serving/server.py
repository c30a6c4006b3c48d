"""The serving loop between response streams and an engine, without Triton.

Engines report tokens from their own thread; a sender thread passes them on, so the engine never
waits for a stream. Sending is a round trip to Triton (~1 ms on a small CPU host), so the sender
merges every chunk of a request that is already queued into one response: tokens that are ready
together travel together, and a stream that falls behind catches up in one send instead of one
per token. The same thread notices cancelled streams (client gone) and aborts their requests,
which frees their KV cache. Asking a Triton stream whether it was cancelled is a round trip too, so
that happens every CANCEL_POLL_S, not at every send: `vlm` aborts what its clients leave at once,
and this is the backstop.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

from vlmserve.llm_serving.engine import Engine, OutputCallback
from vlmserve.llm_serving.request import GenerationRequest, TokenChunk

CANCEL_POLL_S = 0.25


class ResponseStream(Protocol):
    def send(self, chunk: TokenChunk) -> None:
        """Send new tokens; the stream ends with the chunk that is `finished`."""

    def close(self) -> None:
        """End the stream without a chunk (aborted)."""

    def is_cancelled(self) -> bool: ...


def merge_chunks(chunks: list[TokenChunk]) -> list[TokenChunk]:
    """Each request's consecutive chunks as one, tokens concatenated, in the order they first appear."""
    merged: list[TokenChunk] = []
    open_at: dict[str, int] = {}  # request id -> index in merged of its unfinished chunk
    for chunk in chunks:
        index = open_at.get(chunk.request_id)
        if index is None:
            merged.append(chunk)
            index = len(merged) - 1
        else:
            merged[index] = merged[index].then(chunk)
        if merged[index].finished:
            open_at.pop(chunk.request_id, None)
        else:
            open_at[chunk.request_id] = index
    return merged


class LLMServer:
    """Streams each submitted request's tokens from the engine to its ResponseStream."""

    def __init__(self, make_engine: Callable[[OutputCallback], Engine]) -> None:
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[str, ResponseStream] = {}
        self.lock = threading.Lock()
        self.running = True
        self.engine = make_engine(self.outbox.put)
        self.thread = threading.Thread(target=self._send_loop, name="llm-responses", daemon=True)
        self.thread.start()

    @property
    def active_requests(self) -> int:
        return len(self.streams)

    def submit(self, request: GenerationRequest, stream: ResponseStream) -> None:
        """Start generating; raises InvalidRequest (nothing is sent then) for a request that cannot run."""
        with self.lock:
            self.streams[request.request_id] = stream
        try:
            self.engine.add(request)
        except Exception:
            with self.lock:
                self.streams.pop(request.request_id, None)
            raise

    def abort(self, request_id: str) -> None:
        """Stop a request and close its stream (nothing happens for one already finished)."""
        with self.lock:
            stream = self.streams.pop(request_id, None)
        if stream is None:
            return
        self.engine.abort(request_id)
        _quietly(stream.close)

    def _send_loop(self) -> None:
        polled_at = time.monotonic()
        while self.running:
            try:
                chunks = [self.outbox.get(timeout=CANCEL_POLL_S)]
            except queue.Empty:
                chunks = []
            while True:
                try:
                    chunks.append(self.outbox.get_nowait())
                except queue.Empty:
                    break
            for chunk in merge_chunks(chunks):
                self._deliver(chunk)
            if time.monotonic() - polled_at >= CANCEL_POLL_S:
                self._abort_cancelled()
                polled_at = time.monotonic()

    def _deliver(self, chunk: TokenChunk) -> None:
        with self.lock:
            stream = self.streams.get(chunk.request_id)
            if stream is not None and chunk.finished:
                del self.streams[chunk.request_id]
        if stream is not None:  # else aborted: its late tokens go nowhere
            _quietly(stream.send, chunk)

    def _abort_cancelled(self) -> None:
        with self.lock:
            cancelled = [rid for rid, stream in self.streams.items() if stream.is_cancelled()]
        for request_id in cancelled:
            self.abort(request_id)

    def shutdown(self) -> None:
        self.running = False
        self.thread.join(timeout=10)
        self.engine.shutdown()


def _quietly(action: Callable, *args) -> None:
    """A stream that is already gone (cancelled and closed) must not stop the others."""
    try:
        action(*args)
    except Exception:
        pass
