"""An asyncio event loop on a thread of its own, for a Triton model whose requests arrive on other threads.

Triton calls a Python model's `execute` on its own thread; the model's work (BLS calls, vLLM's engine, gRPC
calls to other servers) runs as tasks on this loop, and a thread pool runs what blocks.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str, executor_threads: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(ThreadPoolExecutor(executor_threads, thread_name_prefix=f"{name}-calls"))
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"{name}-loop", daemon=True)
        self._thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Schedule `coroutine` on the loop (from any thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop and wait for its result (not from the loop's own thread)."""
        return self.submit(coroutine).result()

    def stop(self, timeout_s: float = 10) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=timeout_s)
