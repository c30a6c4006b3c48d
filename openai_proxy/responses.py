"""Triton generation chunks -> an OpenAI chat completion, or the SSE payloads of a streamed one."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from client.triton_vlm import GenerationChunk
from openai_proxy.errors import to_api_error
from openai_proxy.schemas import (
    AssistantReply,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
)

DONE = "[DONE]"


@dataclass(frozen=True)
class CompletionMeta:
    """What every object of one completion repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, model: str) -> CompletionMeta:
        return cls(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model)


def _usage(chunk: GenerationChunk) -> Usage:
    return Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                 total_tokens=chunk.prompt_tokens + chunk.completion_tokens)


async def collect_completion(chunks: AsyncIterator[GenerationChunk], meta: CompletionMeta) -> ChatCompletion:
    """The whole answer as one `chat.completion` (the generator always ends with a finish reason)."""
    text = []
    async for chunk in chunks:
        text.append(chunk.text)
    return ChatCompletion(id=meta.id, created=meta.created, model=meta.model, usage=_usage(chunk), choices=[
        Choice(message=AssistantReply(content="".join(text)), finish_reason=chunk.finish_reason)])


async def sse_events(first: GenerationChunk, rest: AsyncIterator[GenerationChunk], meta: CompletionMeta,
                     include_usage: bool) -> AsyncIterator[str]:
    """`data:` payloads of a streamed completion: role, content deltas, finish, usage (if asked), [DONE].

    A failure after the stream has started cannot change the HTTP status any more; it goes out as a
    last event holding an OpenAI error object, and the stream ends there.
    """
    def payload(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=usage)
        # With include_usage OpenAI sends `"usage": null` on every chunk but the last; without it, no key.
        return chunk.model_dump_json(exclude=None if include_usage else {"usage"})

    def chunk_payloads(chunk: GenerationChunk) -> list[str]:
        payloads = [payload([ChunkChoice(delta=Delta(content=chunk.text))])] if chunk.text else []
        if chunk.finish_reason is not None:
            payloads.append(payload([ChunkChoice(delta=Delta(), finish_reason=chunk.finish_reason)]))
        return payloads

    async with aclosing(rest):  # ends the Triton stream whenever this generator stops
        try:
            yield payload([ChunkChoice(delta=Delta(role="assistant", content=""))])
            for item in chunk_payloads(first):
                yield item
            last = first
            async for last in rest:
                for item in chunk_payloads(last):
                    yield item
            if include_usage:
                yield payload([], usage=_usage(last))
            yield DONE
        except Exception as exc:
            yield json.dumps(to_api_error(exc).body())
