"""Deltas on their way to the clients' streams.

Sending a response is a synchronous round trip to tritonserver (the Python backend's `send` waits until the
server has taken it, with the GIL released). By default (VlmSettings.response_threads 0) the event loop that
runs the engine sends each request's delta itself as soon as it has it: while it sends, vLLM's per-request
output collectors merge the tokens of the steps that finish meanwhile, so a stream that falls behind catches up
in one response instead of one per token, and no thread hand-off sits between a token and its send. With sender
threads instead, the loop pushes each request's deltas into that request's outbox and goes on; the threads
drain the outboxes in turn, and until a request's turn comes its deltas merge there.

The writer also watches whether each stream's client is still there (another round trip, so every
CANCEL_POLL_S, not at every send) and tells the outbox once when it has gone (`Outbox.cancel`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vlmserve.outputs.processor import Delta

logger = logging.getLogger(__name__)

CANCEL_POLL_S = 0.2


class ResponseStream(Protocol):
    """Where one request's responses go (in Triton: its decoupled response sender)."""

    def send(self, delta: Delta) -> None:
        """Send a delta; the one that is `finished` ends the stream."""

    def fail(self, error: Exception) -> None:
        """Send an error response that ends the stream."""

    def close(self) -> None:
        """End the stream without a response (its client has gone)."""

    def is_cancelled(self) -> bool: ...


@dataclass(frozen=True)
class _End:
    error: Exception | None  # None: closed, nothing to say


class Outbox:
    """One request's way out: whatever is pushed while a send is under way leaves in the next one."""

    def __init__(self, writer: ResponseWriter, stream: ResponseStream) -> None:
        self.stream = stream
        self._on_cancel: Callable[[], None] | None = None  # set by whoever runs the request
        self._client_gone = False
        self._writer = writer
        self._lock = threading.Lock()
        self._pending: Delta | _End | None = None
        self._scheduled = False  # queued, or being sent: one send per request at a time
        self._ended = False  # the last thing is pushed: nothing after it
        # Held around every call on the stream: once the last response has gone, Triton frees the request, and
        # asking it whether it was cancelled then crashes the server.
        self._stream_lock = threading.Lock()
        self._stream_done = False

    def on_cancel(self, handler: Callable[[], None]) -> None:
        """Call `handler` once the client has gone: at once if it went before the request started (the watcher
        may see it before whoever runs the request has set its handler)."""
        with self._lock:
            self._on_cancel = handler
            gone = self._client_gone
        if gone:
            handler()

    def cancel(self) -> None:
        """The client has gone (the watcher saw it)."""
        with self._lock:
            self._client_gone = True
            handler = self._on_cancel
        if handler is not None:
            handler()

    def push(self, delta: Delta) -> None:
        self._put(delta, delta.finished)

    def fail(self, error: Exception) -> None:
        self._put(_End(error), True)

    def close(self) -> None:
        self._put(_End(None), True)

    def _put(self, item: Delta | _End, last: bool) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = last
            pending = self._pending
            # An end replaces what waits (a client that has gone, or an error, ends the stream as it is).
            self._pending = item if pending is None or isinstance(item, _End) else pending.then(item)
            schedule, self._scheduled = not self._scheduled, True
        if last:
            self._writer.unwatch(self)
        if schedule:
            self._writer.schedule(self)

    def cancelled(self) -> bool:
        """Whether the stream's client has gone; False once the stream has ended."""
        with self._stream_lock:
            return not self._stream_done and self.stream.is_cancelled()

    def flush(self) -> None:
        """Send what is pending (on a sender thread); queue the outbox again if more came meanwhile."""
        with self._lock:
            item, self._pending = self._pending, None
        with self._stream_lock:
            self._stream_done = isinstance(item, _End) or (item is not None and item.finished)
            try:
                if isinstance(item, Delta):
                    self.stream.send(item)
                elif item is not None and item.error is not None:
                    self.stream.fail(item.error)
                elif item is not None:
                    self.stream.close()
            except Exception:  # a stream Triton has closed already must not stop the others
                logger.debug("a response could not be sent", exc_info=True)
        with self._lock:
            self._scheduled = self._pending is not None
            if not self._scheduled:
                return
        # More came from another thread meanwhile (so there are sender threads): it queues behind the others that
        # wait, and every stream gets its turn.
        self._writer.schedule(self)


class ResponseWriter:
    """Sends every request's outbox (on the thread that pushes to it, or on sender threads), and watches for
    clients that have gone."""

    def __init__(self, threads: int, cancel_poll_s: float = CANCEL_POLL_S) -> None:
        """`threads`: sender threads; 0 sends on the thread that pushes (which must then be the only one that
        pushes to, fails or closes an outbox)."""
        self.queue: queue.SimpleQueue[Outbox | None] = queue.SimpleQueue()
        self.cancel_poll_s = cancel_poll_s
        self.inline = threads == 0
        self._watched: set[Outbox] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=self._send_loop, name=f"vlm-responses-{i}", daemon=True)
                         for i in range(threads)]
        self._threads.append(threading.Thread(target=self._watch_loop, name="vlm-cancel-watch", daemon=True))
        for thread in self._threads:
            thread.start()

    def schedule(self, outbox: Outbox) -> None:
        """Send what `outbox` holds: now, or once a sender thread gets to it."""
        if self.inline:
            outbox.flush()
        else:
            self.queue.put(outbox)

    def open(self, stream: ResponseStream) -> Outbox:
        outbox = Outbox(self, stream)
        with self._lock:
            self._watched.add(outbox)
        return outbox

    def unwatch(self, outbox: Outbox) -> None:
        with self._lock:
            self._watched.discard(outbox)

    @property
    def open_streams(self) -> int:
        return len(self._watched)

    def _send_loop(self) -> None:
        while (outbox := self.queue.get()) is not None:
            outbox.flush()

    def _watch_loop(self) -> None:
        while not self._stopped.wait(self.cancel_poll_s):
            with self._lock:
                watched = list(self._watched)
            for outbox in watched:
                try:
                    cancelled = outbox.cancelled()
                except Exception:
                    cancelled = False
                if cancelled:
                    self.unwatch(outbox)
                    outbox.cancel()

    def shutdown(self) -> None:
        self._stopped.set()
        for _ in self._threads:
            self.queue.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
