"""Triton generation chunks -> OpenAI response objects: a whole completion, or the payloads of a stream.

A request with n choices runs n generations. One `ChoiceBuilder` per generation gathers its chunks
and says what each adds to a stream; the format (`ChatFormat`, `TextFormat`) builds the objects of
its API around them. `collect` and `stream_payloads` do the rest for both.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel

from client.triton_vlm import GenerationChunk
from openai_proxy.chat_schemas import (
    AssistantReply,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
)
from openai_proxy.completion_schemas import CompletionChoice, CompletionLogprobs, TextCompletion
from openai_proxy.schemas import PromptTokensDetails, Usage
from openai_proxy.tools import CALL_OPEN, call_id, parse_calls, parse_required

DONE = "[DONE]"


class ChoiceBuilder(Protocol):
    def add(self, chunk: GenerationChunk) -> list[BaseModel]:
        """Take the next chunk; return the stream objects it makes (its finish included)."""

    def payloads(self, chunk: GenerationChunk, exclude: set[str] | None) -> list[str]:
        """Take the next chunk; return the stream objects it makes, serialized."""

    def whole(self) -> BaseModel:
        """The choice of the whole answer, once every chunk is in."""


class ResponseFormat(Protocol):
    id: str

    def choice(self, index: int) -> ChoiceBuilder: ...

    def opening(self, n: int) -> list[BaseModel]: ...

    def whole(self, choices: list[BaseModel], usage: Usage) -> BaseModel: ...

    def usage(self, usage: Usage) -> BaseModel: ...


def _now() -> int:
    return int(time.time())


class TextPayloads:
    """Serialized stream objects that differ only in one text field, for the chunks that are text and nothing
    else (most of a stream): the object is serialized once around a marker, and each chunk's JSON-encoded text
    goes in its place, instead of building and dumping the objects for every token."""

    MARK = "\x00"

    def __init__(self, template: BaseModel, exclude: set[str] | None) -> None:
        self.exclude = exclude
        self.prefix, self.suffix = template.model_dump_json(exclude=exclude).split(json.dumps(self.MARK))

    def __call__(self, text: str) -> str:
        return self.prefix + json.dumps(text, ensure_ascii=False) + self.suffix


def _serialized(items: list[BaseModel], exclude: set[str] | None) -> list[str]:
    return [item.model_dump_json(exclude=exclude) for item in items]


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


@dataclass
class ChatChoice:
    """One choice of a chat completion. tool_mode "none": text is content; "named": text is the arguments
    of a call of `tool_name`; "required": text is a JSON list of calls; "auto": content, then maybe calls."""

    fmt: ChatFormat
    index: int
    tool_mode: str = "none"
    tool_name: str | None = None
    logprobs: bool = False
    text: str = ""
    entries: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    sent: int = 0  # how much of text went out as content ("auto": up to a possible call)
    holding: bool = False  # "auto": a call began, the rest waits for the end
    call_id: str | None = None  # "named": the call, once its first delta went out
    plain: TextPayloads | None = None

    def payloads(self, chunk: GenerationChunk, exclude: set[str] | None) -> list[str]:
        if self.tool_mode != "none" or self.logprobs or chunk.finish_reason is not None:
            return _serialized(self.add(chunk), exclude)
        # Content and nothing else, the most of every stream.
        self.text += chunk.text
        if self.plain is None or self.plain.exclude != exclude:
            self.plain = TextPayloads(self.fmt.chunk([ChunkChoice(index=self.index, delta=Delta(
                content=TextPayloads.MARK))]), exclude)
        return [self.plain(chunk.text)] if chunk.text else []

    def add(self, chunk: GenerationChunk) -> list[ChatCompletionChunk]:
        self.text += chunk.text
        self.entries += chunk.logprobs or []
        delta = self._delta(chunk.text)
        logprobs = ChoiceLogprobs(content=chunk.logprobs) if self.logprobs and chunk.logprobs else None
        out = []
        if delta is not None or logprobs is not None:
            out.append(self.fmt.chunk([ChunkChoice(index=self.index, delta=delta or Delta(content=""),
                                                   logprobs=logprobs)]))
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            _, calls = self._content_and_calls()
            rest = self._final_delta(calls)
            if rest is not None:
                out.append(self.fmt.chunk([ChunkChoice(index=self.index, delta=rest)]))
            out.append(self.fmt.chunk([ChunkChoice(index=self.index, delta=Delta(),
                                                   finish_reason=self._finish_reason(calls))]))
        return out

    def _delta(self, text: str) -> Delta | None:
        if self.tool_mode == "none":
            return Delta(content=text) if text else None
        if self.tool_mode == "named":
            if self.call_id is None:
                self.call_id = call_id()
                return Delta(tool_calls=[ToolCallDelta(index=0, id=self.call_id, type="function",
                                                       function=FunctionCallDelta(name=self.tool_name, arguments=text))])
            return Delta(tool_calls=[ToolCallDelta(index=0, function=FunctionCallDelta(arguments=text))]) if text else None
        if self.tool_mode == "auto" and not self.holding:
            start = self.text.find(CALL_OPEN, self.sent)
            self.holding = start >= 0
            end = start if self.holding else len(self.text) - _held_prefix(self.text, CALL_OPEN)
            if end > self.sent:
                content, self.sent = self.text[self.sent:end], end
                return Delta(content=content)
        return None  # "required", or a call may have begun: held until the end

    def _final_delta(self, calls: list[ToolCall]) -> Delta | None:
        if self.tool_mode in ("none", "named"):
            return None
        if not calls:
            rest = self.text[self.sent:]
            return Delta(content=rest) if rest else None
        # Content before the calls went out already ("auto"); the calls go out whole.
        return Delta(tool_calls=[
            ToolCallDelta(index=i, id=call.id, type="function",
                          function=FunctionCallDelta(name=call.function.name, arguments=call.function.arguments))
            for i, call in enumerate(calls)])

    def _content_and_calls(self) -> tuple[str | None, list[ToolCall]]:
        if self.tool_mode == "named":
            return None, [ToolCall(id=self.call_id or call_id(),
                                   function={"name": self.tool_name, "arguments": self.text or "{}"})]
        if self.tool_mode == "required":
            calls = parse_required(self.text)
            return (None, calls) if calls else (self.text, [])
        if self.tool_mode == "auto":
            return parse_calls(self.text)
        return self.text, []

    def _finish_reason(self, calls: list[ToolCall]) -> str:
        # OpenAI: "tool_calls" when the model chose to call (a forced named call ends with "stop").
        if self.finish_reason == "stop" and self.tool_mode in ("auto", "required") and calls:
            return "tool_calls"
        return self.finish_reason or "stop"

    def whole(self) -> Choice:
        content, calls = self._content_and_calls()
        return Choice(index=self.index, message=AssistantReply(content=content, tool_calls=calls or None),
                      finish_reason=self._finish_reason(calls),
                      logprobs=ChoiceLogprobs(content=self.entries) if self.logprobs else None)


@dataclass(frozen=True)
class ChatFormat:
    """`chat.completion` and `chat.completion.chunk` objects of one completion."""

    model: str
    tool_mode: str = "none"
    tool_name: str | None = None
    logprobs: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=_now)

    def chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def choice(self, index: int) -> ChatChoice:
        return ChatChoice(self, index, self.tool_mode, self.tool_name, self.logprobs)

    def opening(self, n: int) -> list[ChatCompletionChunk]:
        return [self.chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))]) for i in range(n)]

    def whole(self, choices: list[Choice], usage: Usage) -> ChatCompletion:
        return ChatCompletion(id=self.id, created=self.created, model=self.model, usage=usage, choices=choices)

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return self.chunk([], usage)


@dataclass
class TextChoice:
    """One choice of a text completion; with `echo`, the prompt comes first."""

    fmt: TextFormat
    index: int
    text: str = ""
    entries: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    started: bool = False
    plain: TextPayloads | None = None

    def payloads(self, chunk: GenerationChunk, exclude: set[str] | None) -> list[str]:
        if not self.started or self.fmt.logprobs is not None or chunk.finish_reason is not None:
            return _serialized(self.add(chunk), exclude)
        # Text and nothing else, the most of every stream.
        self.text += chunk.text
        if self.plain is None or self.plain.exclude != exclude:
            self.plain = TextPayloads(self.fmt.object([CompletionChoice(index=self.index, text=TextPayloads.MARK)]),
                                      exclude)
        return [self.plain(chunk.text)] if chunk.text else []

    def add(self, chunk: GenerationChunk) -> list[TextCompletion]:
        echo = "" if self.started else self.fmt.echo or ""
        self.started = True
        self.text += echo
        logprobs = self._logprobs(chunk.logprobs or [], len(self.text))
        self.text += chunk.text
        self.entries += chunk.logprobs or []
        out = []
        if echo or chunk.text or chunk.logprobs:
            out.append(self.fmt.object([CompletionChoice(index=self.index, text=echo + chunk.text, logprobs=logprobs)]))
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            out.append(self.fmt.object([CompletionChoice(index=self.index, text="", finish_reason=chunk.finish_reason)]))
        return out

    def _logprobs(self, entries: Sequence[dict], offset: int) -> CompletionLogprobs | None:
        if self.fmt.logprobs is None:
            return None
        offsets = []
        for entry in entries:
            offsets.append(offset)
            offset += len(entry["token"])
        return CompletionLogprobs(
            tokens=[e["token"] for e in entries], token_logprobs=[e["logprob"] for e in entries],
            top_logprobs=[{top["token"]: top["logprob"] for top in e["top_logprobs"]} for e in entries],
            text_offset=offsets)

    def whole(self) -> CompletionChoice:
        return CompletionChoice(index=self.index, text=self.text, finish_reason=self.finish_reason,
                                logprobs=self._logprobs(self.entries, len(self.fmt.echo or "")))


@dataclass(frozen=True)
class TextFormat:
    """`text_completion` objects of one (legacy) completion, whole or streamed."""

    model: str
    logprobs: int | None = None
    echo: str | None = None  # the prompt, when the answer repeats it
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=_now)

    def object(self, choices: list[CompletionChoice], usage: Usage | None = None) -> TextCompletion:
        return TextCompletion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def choice(self, index: int) -> TextChoice:
        return TextChoice(self, index)

    def opening(self, n: int) -> list[TextCompletion]:
        return []

    def whole(self, choices: list[CompletionChoice], usage: Usage) -> TextCompletion:
        return self.object(choices, usage)

    def usage(self, usage: Usage) -> TextCompletion:
        return self.object([], usage)


def _usage(lasts: Sequence[GenerationChunk]) -> Usage:
    """The prompt counts once (it is the same for every choice); completions add up."""
    prompt, completion = lasts[0].prompt_tokens, sum(chunk.completion_tokens for chunk in lasts)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=lasts[0].cached_tokens))


@asynccontextmanager
async def closing_all(streams: Sequence[AsyncIterator[GenerationChunk]]) -> AsyncIterator[AsyncExitStack]:
    """Close every stream on exit (closing one cancels its Triton request); `pop_all` hands them over."""
    async with AsyncExitStack() as stack:
        for stream in streams:
            await stack.enter_async_context(aclosing(stream))
        yield stack


async def merged(streams: Sequence[AsyncIterator[GenerationChunk]]) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """(index, chunk) of several streams, in the order the chunks arrive."""
    if len(streams) == 1:  # the common case, without tasks
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[GenerationChunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk, None))
        except Exception as exc:
            await queue.put((index, None, exc))
        await queue.put((index, None, None))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                running -= 1
            else:
                yield index, chunk
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(firsts: Sequence[GenerationChunk], rests: Sequence[AsyncIterator[GenerationChunk]],
                  fmt: ResponseFormat) -> BaseModel:
    """The whole answer as one object (each generator always ends with a finish reason)."""
    choices, lasts = [fmt.choice(i) for i in range(len(firsts))], list(firsts)
    for choice, first in zip(choices, firsts):
        choice.add(first)
    async for index, chunk in merged(rests):
        choices[index].add(chunk)
        lasts[index] = chunk
    return fmt.whole([choice.whole() for choice in choices], _usage(lasts))


async def stream_payloads(firsts: Sequence[GenerationChunk], rests: Sequence[AsyncIterator[GenerationChunk]],
                          fmt: ResponseFormat, include_usage: bool) -> AsyncIterator[str]:
    """`data:` payloads of a streamed completion: opening, deltas, finish, usage (if asked), [DONE]."""
    # With include_usage OpenAI sends `"usage": null` on every chunk but the last; without it, no key.
    exclude = None if include_usage else {"usage"}
    choices, lasts = [fmt.choice(i) for i in range(len(firsts))], list(firsts)
    for item in fmt.opening(len(firsts)):
        yield item.model_dump_json(exclude=exclude)
    for choice, first in zip(choices, firsts):
        for payload in choice.payloads(first, exclude):
            yield payload
    async for index, chunk in merged(rests):
        lasts[index] = chunk
        for payload in choices[index].payloads(chunk, exclude):
            yield payload
    if include_usage:
        yield fmt.usage(_usage(lasts)).model_dump_json()
    yield DONE
