"""Hundreds of bad requests, interleaved with good ones at concurrency 8, against the real stack.

Every bad request must get its 4xx as an OpenAI error and every good one must succeed; afterwards
the proxy is healthy, its metrics agree, and the engine holds no request.
"""

from __future__ import annotations

import asyncio
import base64
import random
import re
import struct
import time
import zlib
from dataclasses import dataclass, field

import httpx
import pytest

from tests.proxy_helpers import TrickyMediaServer
from tests.test_end_to_end import mp4_bytes, png_bytes
from tests.test_proxy_resilience import wait_until_idle
from launcher.deployment import ProxyProcess
from vlmserve.vlm_settings import VlmSettings

MODEL = "tiny-qwen2-vl"
KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_REQUEST_BYTES, MAX_MEDIA_BYTES = 1_000_000, 300_000
MAX_MEDIA = VlmSettings.__dataclass_fields__["max_media_per_request"].default  # the repository's, read from Triton
CONCURRENCY = 8


@dataclass
class Case:
    name: str
    expect: int
    path: str = "/v1/chat/completions"
    body: dict | None = None
    content: bytes | None = None  # raw body instead of `body`
    method: str = "POST"
    headers: dict = field(default_factory=lambda: dict(AUTH))


def chat(*content, **fields) -> dict:
    return {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": list(content)}], **fields}


def text(words: str) -> dict:
    return {"type": "text", "text": words}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def video(url: str, fps: float = 2) -> dict:
    return {"type": "video_url", "video_url": {"url": url, "fps": fps}}


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 10_000) -> bytes:
    """A real decompression bomb: a side x side grey PNG of zeros, about 100 KB on the wire."""
    compressor, row = zlib.compressobj(9), b"\0" * (side + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def bad_cases(server: TrickyMediaServer) -> list[tuple[Case, int]]:
    """(case, how many times to send it): each kind of mistake the issue names, and a few more."""
    good_png = png_bytes(56, 56, seed=21)
    files = {
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + b"\x13garbage" * 50,
        "truncated.png": good_png[: len(good_png) // 2],
        "notes.txt": b"this is not an image at all " * 20,
        "bomb.png": png_bomb(),
        "huge-header.png": b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 90_000, 90_000, 8, 2, 0,
                                                                                   0, 0)) + png_chunk(b"IEND", b""),
        "noise.mp4": random.Random(1).randbytes(20_000),
        "long.mp4": mp4_bytes(frames=64, fps=2),  # 4480 video tokens: more than the 4096-token context
        "big.png": b"\x89PNG" + b"\0" * (MAX_MEDIA_BYTES + 1000),
    }
    url = {name: server.add(name, data) for name, data in files.items()}
    local_port = server.port
    tiny = data_url(png_bytes(28, 28, seed=22))
    hi = [{"role": "user", "content": "hi"}]
    return [
        # The body itself.
        (Case("malformed JSON", 400, content=b'{"model": "tiny-qwen2-vl", "messages": ['), 6),
        (Case("JSON array body", 400, content=b"[1, 2, 3]"), 4),
        (Case("deeply nested JSON", 400, content=b"[" * 50_000 + b"]" * 50_000), 4),
        (Case("not UTF-8", 400, content=b'{"model": "\xff\xfe"}'), 4),
        (Case("empty body", 400, content=b""), 4),
        (Case("unpaired surrogate", 400, content=b'{"model": "tiny-qwen2-vl", "max_tokens": 4, '
                                                 b'"messages": [{"role": "user", "content": "x\\ud800y"}]}'), 4),
        (Case("body over the size limit", 413, body=chat(text("x" * (MAX_REQUEST_BYTES + 10)))), 4),
        # The schema.
        (Case("unknown top-level field", 400, body={**chat(text("hi")), "frobnicate": True}), 5),
        (Case("unknown field in a part", 400, body=chat({"type": "text", "text": "hi", "cache": 1})), 4),
        (Case("no messages", 400, body={"model": MODEL}), 4),
        (Case("empty messages", 400, body={"model": MODEL, "messages": []}), 4),
        (Case("tool role", 400, body={"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}), 4),
        (Case("content of the wrong type", 400, body={"model": MODEL, "messages": [{"role": "user", "content": 5}]}),
         4),
        (Case("audio part", 400, body=chat({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}})), 4),
        (Case("image from the assistant", 400, body={"model": MODEL, "messages": [
            {"role": "assistant", "content": [image(tiny)]}]}), 4),
        (Case("n=17", 400, body={**chat(text("hi")), "n": 17}), 4),
        (Case("top_logprobs over the limit", 400, body={**chat(text("hi")), "logprobs": True, "top_logprobs": 21}), 4),
        (Case("top_logprobs without logprobs", 400, body={**chat(text("hi")), "top_logprobs": 2}), 3),
        (Case("unknown tool name", 400, body={**chat(text("hi")), "tools": [TOOL],
                                              "tool_choice": {"type": "function", "function": {"name": "nope"}}}), 4),
        (Case("tool without a function", 400, body={**chat(text("hi")), "tools": [{"type": "function"}]}), 3),
        (Case("tool call arguments not JSON", 400, body={"model": MODEL, "max_tokens": 4, "messages": [
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                  "function": {"name": "f", "arguments": "{oops"}}]}]}), 3),
        (Case("schema that does not compile", 400, body={**chat(text("hi")), "response_format": {
            "type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "frob"}}}}), 4),
        (Case("schema with a dangling $ref", 400, body={**chat(text("hi")), "response_format": {
            "type": "json_schema", "json_schema": {"name": "s", "schema": {"$ref": "#/nowhere"}}}}), 3),
        (Case("regex that does not compile", 400, body={**chat(text("hi")),
                                                         "structured_outputs": {"regex": "(unclosed"}}), 3),
        (Case("two output constraints", 400, body={**chat(text("hi")), "response_format": {"type": "json_object"},
                                                    "structured_outputs": {"choice": ["a"]}}), 3),
        (Case("min_tokens over max_tokens", 400, body={**chat(text("hi")), "max_tokens": 4, "min_tokens": 9}), 3),
        (Case("temperature 7", 400, body={**chat(text("hi")), "temperature": 7}), 4),
        (Case("max_tokens 0", 400, body={**chat(text("hi")), "max_tokens": 0}), 4),
        (Case("negative seed", 400, body={**chat(text("hi")), "seed": -5}), 4),
        (Case("min_p 1.5", 400, body={**chat(text("hi")), "min_p": 1.5}), 4),
        (Case("five stop strings", 400, body={**chat(text("hi")), "stop": list("abcde")}), 4),
        (Case("stream_options without stream", 400, body={**chat(text("hi")),
                                                          "stream_options": {"include_usage": True}}), 4),
        (Case("video fps 0", 400, body=chat(video(tiny, fps=0))), 4),
        (Case("unknown model", 404, body={"model": "gpt-4o", "messages": hi}), 5),
        (Case("no API key", 401, body=chat(text("hi")), headers={}), 5),
        (Case("wrong API key", 401, body=chat(text("hi")), headers={"Authorization": "Bearer guess"}), 5),
        (Case("GET a POST route", 405, method="GET"), 4),
        (Case("unknown route", 404, path="/v1/embeddings", body={"model": MODEL, "input": "x"}), 4),
        # Text completions.
        (Case("two prompts", 400, "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}), 4),
        (Case("token id prompt", 400, "/v1/completions", {"model": MODEL, "prompt": [1, 2, 3]}), 4),
        (Case("echo with logprobs", 400, "/v1/completions", {"model": MODEL, "prompt": "a", "echo": True,
                                                              "logprobs": 1}), 4),
        (Case("completion logprobs over the limit", 400, "/v1/completions",
              {"model": MODEL, "prompt": "a", "logprobs": 21}), 3),
        (Case("empty prompt", 400, "/v1/completions", {"model": MODEL, "prompt": "", "max_tokens": 4}), 4),
        (Case("prompt longer than the context", 400, "/v1/completions",
              {"model": MODEL, "prompt": "word " * 5000, "max_tokens": 4}), 4),
        (Case("chat longer than the context", 400, body=chat(text("word " * 5000))), 4),
        (Case("max_tokens beyond the context", 400, body={**chat(text("hi")), "max_tokens": 100_000}), 4),
        # Media URLs.
        (Case("bad base64", 400, body=chat(image("data:image/png;base64,@@not base64@@"))), 5),
        (Case("file URL", 400, body=chat(image("file:///etc/passwd"))), 4),
        (Case("ftp URL", 400, body=chat(image("ftp://example.com/a.png"))), 4),
        (Case("missing file", 400, body=chat(image(server.url("/file/missing.png")))), 4),
        (Case("fetch timeout", 400, body=chat(image(server.url("/slow")))), 4),
        (Case("download over the size limit", 400, body=chat(image(url["big.png"]))), 4),
        (Case("endless download", 400, body=chat(image(server.url("/endless")))), 3),
        (Case("too many images", 400, body=chat(*[image(tiny)] * (MAX_MEDIA + 1))), 4),
        # SSRF: addresses off the allow-list (127.0.0.1/32 only), directly or through a redirect.
        (Case("other loopback address", 400, body=chat(image(f"http://127.0.0.2:{local_port}/file/corrupt.png"))), 4),
        (Case("IPv6 loopback", 400, body=chat(image(f"http://[::1]:{local_port}/x.png"))), 4),
        (Case("cloud metadata", 400, body=chat(image("http://169.254.169.254/latest/meta-data/"))), 4),
        (Case("private network", 400, body=chat(image("http://10.0.0.1/a.png"))), 4),
        (Case("redirect to metadata", 400, body=chat(image(
            server.url("/redirect?to=http://169.254.169.254/latest/meta-data/")))), 4),
        (Case("redirect loop", 400, body=chat(image(server.url("/loop")))), 3),
        # Media bytes (rejected inside Triton).
        (Case("corrupt image", 400, body=chat(text("what?"), image(url["corrupt.png"]))), 5),
        (Case("truncated image", 400, body=chat(image(url["truncated.png"]))), 5),
        (Case("text as an image", 400, body=chat(image(url["notes.txt"]))), 4),
        (Case("decompression bomb", 400, body=chat(image(url["bomb.png"]))), 4),
        (Case("huge image header", 400, body=chat(image(data_url(files["huge-header.png"])))), 4),
        (Case("corrupt image, streamed", 400, body={**chat(image(url["corrupt.png"])), "stream": True}), 4),
        (Case("undecodable video", 400, body=chat(video(url["noise.mp4"]))), 4),
        (Case("video too long for the context", 400, body=chat(video(url["long.mp4"]))), 2),
    ]


TOOL = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"], "additionalProperties": False}}}


def good_cases(server: TrickyMediaServer) -> list[Case]:
    picture = server.add("good.png", png_bytes(56, 84, seed=23))
    clip = server.add("good.mp4", mp4_bytes())
    return [
        Case("chat", 200, body=chat(text("Say something."), temperature=0)),
        Case("chat stream with image", 200, body=chat(text("What is it?"), image(picture), stream=True,
                                                      stream_options={"include_usage": True}, seed=3, stop=["zz"])),
        Case("chat with inline image and system prompt", 200, body={
            "model": MODEL, "max_completion_tokens": 4, "temperature": 0.7, "top_p": 0.9, "min_p": 0.05,
            "repetition_penalty": 1.1, "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [image(data_url(png_bytes(28, 56, seed=24))), text("Describe.")]}]}),
        Case("chat with video", 200, body=chat(video(clip), text("What happens?"), max_tokens=3)),
        Case("text completion", 200, "/v1/completions", {"model": MODEL, "prompt": "Once upon", "max_tokens": 4}),
        Case("text completion stream", 200, "/v1/completions", {"model": MODEL, "prompt": ["Hello"], "max_tokens": 3,
                                                                "stream": True, "presence_penalty": 0.5}),
        Case("chat with the extras", 200, body=chat(text("Weather?"), n=2, logprobs=True, top_logprobs=2, tools=[TOOL],
                                                    tool_choice="required", parallel_tool_calls=False, stream=True)),
    ]


async def send(client: httpx.AsyncClient, base_url: str, case: Case) -> str | None:
    """None if the answer is what `case` expects, otherwise what went wrong."""
    kwargs = {"content": case.content} if case.content is not None else {"json": case.body}
    if case.method == "GET":
        kwargs = {}
    response = await client.request(case.method, base_url + case.path, headers=case.headers, **kwargs)
    if response.status_code != case.expect:
        return f"{case.name}: HTTP {response.status_code} (expected {case.expect}): {response.text[:300]}"
    if case.expect != 200:
        error = response.json().get("error", {})
        if set(error) != {"message", "type", "param", "code"} or not error["message"]:
            return f"{case.name}: not an OpenAI error: {response.text[:300]}"
        return None
    if response.headers["content-type"].startswith("text/event-stream"):
        payloads = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        if payloads[-1:] != ["[DONE]"] or any('"error"' in p for p in payloads):
            return f"{case.name}: stream did not end cleanly: {payloads[-2:]}"
        return None
    return None if response.json()["choices"] else f"{case.name}: no choices: {response.text[:300]}"


@pytest.fixture(scope="module")
def media():
    # /slow answers well after the strict proxy's media timeout; good fetches get the rest of the margin,
    # which they need on two busy cores.
    with TrickyMediaServer(slow_s=8) as server:
        yield server


@pytest.fixture(scope="module")
def strict_proxy(stack, tmp_path_factory):
    """A proxy with tight limits and an API key, in front of the stack's Triton."""
    proxy = ProxyProcess(stack.triton.grpc_url, 0,
                         log_path=tmp_path_factory.mktemp("fuzz") / "proxy.log", extra_args=[
                             "--api-key", KEY, "--allow-media-network", "127.0.0.1/32",
                             "--max-request-bytes", str(MAX_REQUEST_BYTES), "--max-media-bytes", str(MAX_MEDIA_BYTES),
                             "--media-timeout-s", "3"])
    proxy.start()
    yield proxy
    proxy.stop()


def proxy_metric_sum(base_url: str, status_pattern: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return sum(float(value) for value in re.findall(
        rf'^vlm_proxy_requests_total{{route="[^"]*",status="{status_pattern}"}} ([0-9.e+]+)$', text, re.MULTILINE))


def test_bad_requests_interleaved_with_good_ones_at_concurrency_8(stack, strict_proxy, media):
    base_url = strict_proxy.base_url.removesuffix("/v1")
    bad = [case for case, times in bad_cases(media) for _ in range(times)]
    good = good_cases(media) * 8
    cases = bad + good
    random.Random(0).shuffle(cases)
    assert len(bad) >= 200

    async def run_all() -> list[str | None]:
        slots = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=CONCURRENCY)) as client:
            async def one(case: Case) -> str | None:
                async with slots:
                    return await send(client, base_url, case)
            return await asyncio.gather(*map(one, cases))

    started = time.monotonic()
    problems = [problem for problem in asyncio.run(run_all()) if problem]
    elapsed = time.monotonic() - started
    print(f"\n{len(bad)} bad and {len(good)} good requests at concurrency {CONCURRENCY} in {elapsed:.1f}s")
    assert not problems, "\n".join(problems)
    assert elapsed < 120

    assert httpx.get(base_url + "/health", timeout=10).status_code == 200
    after = httpx.post(base_url + "/v1/chat/completions", headers=AUTH, timeout=60, json=chat(text("Still fine?")))
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] > 0
    assert proxy_metric_sum(base_url, "4[0-9][0-9]") == len(bad)
    assert proxy_metric_sum(base_url, "5[0-9][0-9]") == 0
    wait_until_idle(stack)
