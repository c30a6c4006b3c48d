"""Clients that leave and servers that stop, on the real stack: engine resources must come back."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import signal

import httpx
import pytest

from tests.test_end_to_end import _metric
from tests.test_engine_metrics import settled_metrics
from launcher.deployment import ProxyProcess
from perf.soak import private_rss_bytes
from perf.vit_stack import noise_png

MODEL = "tiny-qwen2-vl"
LONG = {"model": MODEL, "max_tokens": 3000, "temperature": 0,
        "messages": [{"role": "user", "content": "Write a very long story."}]}


def wait_until_idle(stack, timeout_s: float = 20) -> None:
    """Wait until the engine holds no request and no KV block."""
    values = settled_metrics(stack, timeout_s=timeout_s)
    assert values["vlm_llm_active_requests"] == 0 and values["vlm_llm_kv_blocks_used"] == 0, \
        "engine requests or KV blocks were not freed"


async def open_stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[httpx.Response, list[str]]:
    """A started SSE stream and the payloads read so far (at least the first content chunk)."""
    response = await client.send(client.build_request("POST", url, json=body), stream=True)
    assert response.status_code == 200
    lines = response.aiter_lines()
    payloads = []
    while len(payloads) < 2:  # the role chunk, then the first text
        line = await anext(lines)
        if line.startswith("data: "):
            payloads.append(line.removeprefix("data: "))
    response.lines = lines  # the rest, for whoever reads on
    return response, payloads


def steps_until_idle(stack, since: float) -> float:
    """Engine steps run from the reading `since` until the engine held nothing any more."""
    wait_until_idle(stack)
    return _metric(stack, "vlm_llm_steps_total") - since


def test_twenty_streams_closed_mid_generation_free_the_engine(stack):
    # Each request asks for 3000 tokens; vLLM decodes the tiny model so fast that a good part of them is
    # done while 20 streams open, so what is measured is how many steps run after the clients have gone:
    # a few if cancelled ones stop within a step or two (readings lag by up to 0.5 s of steps), the
    # hundreds to thousands left of the 3000 if they do not.
    async def close_streams(client: httpx.AsyncClient, url: str) -> float:
        streams = await asyncio.gather(*(open_stream(client, url, {**LONG, "stream": True}) for _ in range(20)))
        assert _metric(stack, "vlm_llm_active_requests") > 0
        for response, _ in streams:
            await response.aclose()
        return _metric(stack, "vlm_llm_steps_total")

    async def give_up_waiting(client: httpx.AsyncClient, url: str) -> float:
        # Non-streamed requests whose client gives up before the answer: the same must happen.
        quick = httpx.Timeout(60, read=1.0)
        results = await asyncio.gather(*(client.post(url, json=LONG, timeout=quick) for _ in range(5)),
                                       return_exceptions=True)
        assert all(isinstance(r, httpx.ReadTimeout) for r in results)
        return _metric(stack, "vlm_llm_steps_total")

    async def run(phase) -> float:
        async with httpx.AsyncClient(timeout=60) as client:
            return await phase(client, stack.proxy.base_url + "/chat/completions")

    assert steps_until_idle(stack, asyncio.run(run(close_streams))) < 200
    assert steps_until_idle(stack, asyncio.run(run(give_up_waiting))) < 200
    ok = httpx.post(stack.proxy.base_url + "/chat/completions", timeout=60, json={**LONG, "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] > 0


async def leave_at(client: httpx.AsyncClient, url: str, rng: random.Random) -> None:
    """A stream whose client goes away at a point `rng` picks: before the response has started (the proxy
    still fetching, encoding or waiting for the first token), or after reading some of the answer."""
    sending = asyncio.ensure_future(client.send(client.build_request("POST", url, json={**LONG, "stream": True}),
                                                stream=True))
    if rng.random() < 0.3:
        await asyncio.sleep(rng.uniform(0, 0.3))
        if not sending.done():
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            return
    response = await sending
    lines = response.aiter_lines()
    for _ in range(rng.randint(0, 40)):
        if await anext(lines, None) is None:
            break
    await response.aclose()


def test_streams_closed_at_any_point_free_the_engine(stack):
    # The twenty-stream test above closes every stream at the same point; here each leaves at its own,
    # three rounds of twenty, and each round's last cancellations must stop the engine within a few steps.
    async def round_of(seed: int) -> float:
        rng = random.Random(seed)
        async with httpx.AsyncClient(timeout=60) as client:
            url = stack.proxy.base_url + "/chat/completions"
            await asyncio.gather(*(leave_at(client, url, random.Random(rng.random())) for _ in range(20)))
        return _metric(stack, "vlm_llm_steps_total")

    for seed in range(3):
        assert steps_until_idle(stack, asyncio.run(round_of(seed))) < 200, f"round {seed}"


@pytest.fixture
def draining_proxy(stack, tmp_path):
    # A grace period well below the time vLLM takes for the tiny model's longest answer (4000 tokens, a few
    # seconds), and well above a 16-token one.
    proxy = ProxyProcess(stack.triton.grpc_url, 0, log_path=tmp_path / "proxy.log",
                         extra_args=["--shutdown-grace-s", "1"])
    proxy.start()
    yield proxy
    proxy.stop()


def test_sigterm_lets_short_streams_finish_and_ends_long_ones_with_an_error_event(stack, draining_proxy):
    async def read_rest(response: httpx.Response) -> list[str]:
        return [line.removeprefix("data: ") async for line in response.lines if line.startswith("data: ")]

    async def run() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(timeout=60) as client:
            url = draining_proxy.base_url + "/chat/completions"
            (long, _), (short, _) = await asyncio.gather(
                open_stream(client, url, {**LONG, "stream": True, "max_tokens": 4000, "ignore_eos": True}),
                open_stream(client, url, {**LONG, "stream": True, "max_tokens": 16}))
            draining_proxy.process.send_signal(signal.SIGTERM)
            return await asyncio.gather(read_rest(long), read_rest(short))

    long_rest, short_rest = asyncio.run(run())
    assert short_rest[-1] == "[DONE]"
    assert json.loads(long_rest[-1])["error"]["code"] == "server_shutting_down" and "[DONE]" not in long_rest
    # uvicorn re-raises the signal it caught once it has shut down: dying of SIGTERM is the normal end.
    assert draining_proxy.process.wait(15) == -signal.SIGTERM
    wait_until_idle(stack)


def test_tritonserver_keeps_no_memory_of_finished_requests(stack):
    """Ended streams must leave nothing in tritonserver: 2.51 keeps a stream's request (media bytes included)
    for good if the client cancels it while the server winds it down, which grew it ~50 KB a request."""
    image = "data:image/png;base64," + base64.b64encode(noise_png(640, 336, 7)).decode()  # ~650 KB of PNG
    body = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": image}}]}]}

    async def send(count: int) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            async def one_client() -> None:
                for _ in range(count // 2):
                    response = await client.post(f"{stack.proxy.base_url}/chat/completions", json=body)
                    assert response.status_code == 200, response.text

            await asyncio.gather(one_client(), one_client())

    asyncio.run(send(40))  # warm-up: pools and caches reach their size
    before = private_rss_bytes(stack.triton.process.pid)
    asyncio.run(send(200))
    grown = private_rss_bytes(stack.triton.process.pid) - before
    print(f"tritonserver RSS grew {grown / 2**20:.1f} MB over 200 requests with a 650 KB image")
    assert grown < 8 * 2**20  # measured: 1.4-1.9 MB; 20 MB with the leak


def test_a_thousand_streams_closed_at_random_points_leave_nothing_behind(stack):
    """Every cancelled request is aborted in the engine (its KV cache back to idle), and tritonserver keeps
    nothing of the streams the clients left (RSS less shared memory, after a warm-up)."""
    async def streams(count: int, seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(timeout=60) as client:
            url = stack.proxy.base_url + "/chat/completions"
            for _ in range(count // 50):
                await asyncio.gather(*(leave_at(client, url, random.Random(rng.random())) for _ in range(50)))

    asyncio.run(streams(100, 0))  # warm-up: pools and the backend's shm regions reach their size
    wait_until_idle(stack)
    before = private_rss_bytes(stack.triton.process.pid)
    asyncio.run(streams(1000, 1))
    wait_until_idle(stack)
    grown = private_rss_bytes(stack.triton.process.pid) - before
    print(f"tritonserver RSS less shared memory grew {grown / 2**20:.1f} MB over 1000 streams left at random points")
    assert grown < 5 * 2**20
