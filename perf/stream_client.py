"""One streamed chat completion through the OpenAI client, timed the way users feel it."""

from __future__ import annotations

import time
from dataclasses import dataclass

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
