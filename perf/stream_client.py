"""One streamed chat completion through the OpenAI client, timed the way users feel it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import openai

from perf.stats import RequestRecord, count_completion_tokens


@dataclass(frozen=True)
class Target:
    """An OpenAI-compatible server under test."""

    name: str
    base_url: str
    model: str
    # A video part's `fps` is ours (and the mission's API); vLLM ignores it there and takes the sampling
    # rate per request as `media_io_kwargs` instead, so for vLLM it is sent there as well.
    fps_in_media_io_kwargs: bool = False
    # The pids whose process trees make up the server (for its CPU use), when it runs on this machine.
    process_roots: Callable[[], list[int]] | None = field(default=None, compare=False)

    def client(self, timeout_s: float = 600.0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="EMPTY", max_retries=0, timeout=timeout_s)


def video_fps(messages: list[dict]) -> float | None:
    """The `fps` of the last video part in `messages` that names one."""
    fps = None
    for message in messages:
        for part in message["content"] if isinstance(message["content"], list) else ():
            fps = part.get("video_url", {}).get("fps", fps)
    return fps


def stream_chat(client: openai.OpenAI, target: Target, messages: list[dict],
                max_tokens: int) -> tuple[RequestRecord, str]:
    """Send `messages` with greedy decoding and stream the answer; the record and the answer's text."""
    extra_body = {}
    if target.fps_in_media_io_kwargs and (fps := video_fps(messages)) is not None:
        extra_body["media_io_kwargs"] = {"video": {"fps": fps}}
    start = time.perf_counter()
    ttft, chunks, usage, text = None, 0, None, []
    try:
        stream = client.chat.completions.create(
            model=target.model, messages=messages, stream=True, max_completion_tokens=max_tokens, temperature=0,
            stream_options={"include_usage": True}, extra_body=extra_body or None)
        for chunk in stream:
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                chunks += 1
                text.append(delta)
            if chunk.usage is not None:
                usage = chunk.usage
    except openai.OpenAIError as exc:
        latency = time.perf_counter() - start
        return RequestRecord(latency, latency, 0, error=f"{type(exc).__name__}: {exc}"), ""
    latency = time.perf_counter() - start
    tokens = count_completion_tokens(usage.completion_tokens if usage else None, chunks)
    record = RequestRecord(latency if ttft is None else ttft, latency, tokens, usage.prompt_tokens if usage else 0)
    return record, "".join(text)


async def stream_chat_async(client: httpx.AsyncClient, target: Target, messages: list[dict], max_tokens: int,
                            ignore_eos: bool = False) -> tuple[RequestRecord, str]:
    """`stream_chat` on an asyncio HTTP client: the glue-bound workload keeps 64 streams open from one process,
    where 64 threads of the OpenAI client would spend more of the two cores than the servers under test."""
    body = {"model": target.model, "messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "stream_options": {"include_usage": True}, **({"ignore_eos": True} if ignore_eos else {})}
    start = time.perf_counter()
    ttft, chunks, usage, text = None, 0, None, []
    try:
        async with client.stream("POST", f"{target.base_url}/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                delta = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                if delta:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    chunks += 1
                    text.append(delta)
                usage = chunk.get("usage") or usage
    except (httpx.HTTPError, RuntimeError, ValueError) as exc:
        latency = time.perf_counter() - start
        return RequestRecord(latency, latency, 0, error=f"{type(exc).__name__}: {exc}"), ""
    latency = time.perf_counter() - start
    tokens = count_completion_tokens(usage["completion_tokens"] if usage else None, chunks)
    record = RequestRecord(latency if ttft is None else ttft, latency, tokens, usage["prompt_tokens"] if usage else 0)
    return record, "".join(text)
