"""Triton generation chunks -> OpenAI response objects: a whole completion, or the payloads of a stream.

Chat and text completions differ only in the shape of their objects; `ChatFormat` and `TextFormat`
build those, `collect` and `stream_payloads` do the rest for both.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel

from client.triton_vlm import GenerationChunk
from openai_proxy.chat_schemas import (
    AssistantReply,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    Delta,
)
from openai_proxy.completion_schemas import CompletionChoice, TextCompletion
from openai_proxy.schemas import Usage

DONE = "[DONE]"


class ResponseFormat(Protocol):
    id: str

    def whole(self, text: str, finish_reason: str, usage: Usage) -> BaseModel: ...

    def opening(self) -> list[BaseModel]: ...

    def delta(self, text: str) -> BaseModel: ...

    def finish(self, finish_reason: str) -> BaseModel: ...

    def usage(self, usage: Usage) -> BaseModel: ...


def _now() -> int:
    return int(time.time())


@dataclass(frozen=True)
class ChatFormat:
    """`chat.completion` and `chat.completion.chunk` objects of one completion."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=_now)

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def whole(self, text: str, finish_reason: str, usage: Usage) -> ChatCompletion:
        return ChatCompletion(id=self.id, created=self.created, model=self.model, usage=usage, choices=[
            Choice(message=AssistantReply(content=text), finish_reason=finish_reason)])

    def opening(self) -> list[ChatCompletionChunk]:
        return [self._chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])]

    def delta(self, text: str) -> ChatCompletionChunk:
        return self._chunk([ChunkChoice(delta=Delta(content=text))])

    def finish(self, finish_reason: str) -> ChatCompletionChunk:
        return self._chunk([ChunkChoice(delta=Delta(), finish_reason=finish_reason)])

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk([], usage)


@dataclass(frozen=True)
class TextFormat:
    """`text_completion` objects of one (legacy) completion, whole or streamed."""

    model: str
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=_now)

    def _object(self, choices: list[CompletionChoice], usage: Usage | None = None) -> TextCompletion:
        return TextCompletion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def whole(self, text: str, finish_reason: str, usage: Usage) -> TextCompletion:
        return self._object([CompletionChoice(text=text, finish_reason=finish_reason)], usage)

    def opening(self) -> list[TextCompletion]:
        return []

    def delta(self, text: str) -> TextCompletion:
        return self._object([CompletionChoice(text=text)])

    def finish(self, finish_reason: str) -> TextCompletion:
        return self._object([CompletionChoice(text="", finish_reason=finish_reason)])

    def usage(self, usage: Usage) -> TextCompletion:
        return self._object([], usage)


def _usage(chunk: GenerationChunk) -> Usage:
    return Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                 total_tokens=chunk.prompt_tokens + chunk.completion_tokens)


async def collect(first: GenerationChunk, rest: AsyncIterator[GenerationChunk], fmt: ResponseFormat) -> BaseModel:
    """The whole answer as one object (the generator always ends with a finish reason)."""
    text, last = [first.text], first
    async for last in rest:
        text.append(last.text)
    return fmt.whole("".join(text), last.finish_reason, _usage(last))


async def stream_payloads(first: GenerationChunk, rest: AsyncIterator[GenerationChunk], fmt: ResponseFormat,
                          include_usage: bool) -> AsyncIterator[str]:
    """`data:` payloads of a streamed completion: opening, deltas, finish, usage (if asked), [DONE]."""
    # With include_usage OpenAI sends `"usage": null` on every chunk but the last; without it, no key.
    exclude = None if include_usage else {"usage"}

    def payloads(chunk: GenerationChunk) -> list[str]:
        objects = [fmt.delta(chunk.text)] if chunk.text else []
        if chunk.finish_reason is not None:
            objects.append(fmt.finish(chunk.finish_reason))
        return [item.model_dump_json(exclude=exclude) for item in objects]

    for item in fmt.opening():
        yield item.model_dump_json(exclude=exclude)
    for payload in payloads(first):
        yield payload
    last = first
    async for last in rest:
        for payload in payloads(last):
            yield payload
    if include_usage:
        yield fmt.usage(_usage(last)).model_dump_json()
    yield DONE
