"""The interface both LLM engines implement for the serving loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from vlmserve.llm_serving.request import GenerationRequest, TokenChunk

if TYPE_CHECKING:  # the native engine's package imports torch, which the repository generator does without
    from vlmserve.engine.stats import EngineStats

OutputCallback = Callable[[TokenChunk], None]


class Engine(Protocol):
    """Generates for many requests at once; reports each request's new tokens through its callback.

    `add` and `abort` return at once and may be called from any thread; the callback runs on the
    engine's own thread. A request ends with exactly one finished chunk (or, once aborted, with none).
    """

    stats: EngineStats  # counters as Triton metrics publish them (vlm_llm_*)
    media_token_ids: tuple[int, int]  # the image and video pad token ids

    def add(self, request: GenerationRequest) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def kv_blocks_total(self) -> int: ...

    def kv_blocks_used(self) -> int: ...

    def has_unfinished(self) -> bool: ...

    def shutdown(self) -> None: ...
