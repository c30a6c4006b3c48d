"""The proxy's guard rails without Triton: API key, body size, requests in flight, timeouts, draining, metrics."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import replace

import pytest

from client.triton_vlm import GenerationChunk
from tests.proxy_helpers import (
    ANSWER,
    MODEL,
    SETTINGS,
    FakeTriton,
    assert_openai_error,
    client_with,
    sse_payloads,
    user,
)

CHAT = {"model": MODEL, "messages": [user("hi")]}
SLOW = [GenerationChunk("tok ", None, 5, i + 1) for i in range(9)] + [GenerationChunk("", "length", 5, 10)]


def in_background(call) -> tuple[threading.Thread, list]:
    """Run `call` in a thread; its result lands in the returned list."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(call()))
    thread.start()
    return thread, result


def wait_for(condition, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_api_key_guards_the_v1_routes_only():
    with client_with(FakeTriton(ANSWER), replace(SETTINGS, api_key="sekret")) as http:
        assert_openai_error(http.post("/v1/chat/completions", json=CHAT), 401, "didn't provide an API key")
        wrong = http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"})
        assert_openai_error(wrong, 401, "Incorrect API key")
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        assert_openai_error(http.get("/v1/models"), 401, "API key")
        ok = http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "Hello"
        assert http.get("/metrics").status_code == 200 and http.get("/health").status_code == 200


def test_request_bodies_over_the_limit_get_413():
    with client_with(FakeTriton(ANSWER), replace(SETTINGS, max_request_bytes=1000)) as http:
        big = {**CHAT, "messages": [user("x" * 2000)]}
        assert_openai_error(http.post("/v1/chat/completions", json=big), 413, "1000 byte limit")

        def chunked():  # no Content-Length: counted as it arrives
            yield json.dumps(big).encode()

        response = http.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
        assert_openai_error(response, 413, "1000 byte limit")
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_requests_beyond_the_in_flight_limit_get_429_until_a_slot_frees():
    fake = FakeTriton(SLOW, delay_s=0.1)
    with client_with(fake, replace(SETTINGS, max_concurrent_requests=1)) as http:
        thread, first = in_background(lambda: http.post("/v1/chat/completions", json=CHAT))
        wait_for(lambda: fake.calls)
        busy = http.post("/v1/chat/completions", json=CHAT)
        assert_openai_error(busy, 429, "busy")
        assert busy.headers["retry-after"] == "1"
        assert http.get("/v1/models").status_code == 200, "only generations count"
        thread.join()
        assert first[0].status_code == 200
        assert http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 200


def test_a_request_over_its_time_limit_gets_504_and_its_generation_is_cancelled():
    # The first token comes at once and the rest far apart, so the stream below has started long before its
    # limit even on a loaded machine, and neither request can finish within it.
    fake = FakeTriton(SLOW, delay_s=2.0, first_delay_s=0)
    with client_with(fake, replace(SETTINGS, request_timeout_s=1.5)) as http:
        response = http.post("/v1/chat/completions", json=CHAT)
        assert_openai_error(response, 504, "longer than the 1.5s limit")
        assert response.json()["error"]["code"] == "timeout" and fake.closed == 1

        # A stream that has started ends with an error event instead.
        payloads = sse_payloads(http.post("/v1/chat/completions", json={**CHAT, "stream": True}))
        assert "[DONE]" not in payloads and json.loads(payloads[-1])["error"]["code"] == "timeout"
        assert any("tok" in p for p in payloads) and fake.closed == 2


def test_draining_ends_streams_with_an_error_event_and_refuses_new_requests():
    fake = FakeTriton(SLOW, delay_s=0.3, first_delay_s=0)
    with client_with(fake, replace(SETTINGS, shutdown_grace_s=0.5)) as http:
        thread, streamed = in_background(lambda: http.post("/v1/chat/completions", json={**CHAT, "stream": True}))
        wait_for(lambda: fake.calls)
        time.sleep(0.5)  # the stream has started
        http.portal.call(http.app.state.lifetimes.drain)
        assert_openai_error(http.post("/v1/chat/completions", json=CHAT), 503, "shutting down")
        thread.join()
        payloads = sse_payloads(streamed[0])
        assert any("tok" in p for p in payloads) and "[DONE]" not in payloads
        assert json.loads(payloads[-1])["error"]["code"] == "server_shutting_down"
        assert fake.closed == 1, "the generation was cancelled"


def test_a_short_stream_finishes_normally_within_the_grace_period():
    fake = FakeTriton(ANSWER, delay_s=0.1)
    with client_with(fake, replace(SETTINGS, shutdown_grace_s=5)) as http:
        thread, streamed = in_background(lambda: http.post("/v1/chat/completions", json={**CHAT, "stream": True}))
        wait_for(lambda: fake.calls)
        http.portal.call(http.app.state.lifetimes.drain)
        thread.join()
        assert sse_payloads(streamed[0])[-1] == "[DONE]"


def test_lost_requests_end_at_once_with_503_and_retry_after_and_later_ones_are_served():
    """What the supervisor's SIGUSR1 does when a decoupled model's process died: Triton never ends its streams."""
    fake = FakeTriton(SLOW, delay_s=30)  # a stream that would hang for minutes
    with client_with(fake) as http:
        thread, answered = in_background(lambda: http.post("/v1/chat/completions", json=CHAT))
        streamed_thread, streamed = in_background(
            lambda: http.post("/v1/chat/completions", json={**CHAT, "stream": True}))
        wait_for(lambda: len(fake.calls) == 2)
        started = time.monotonic()
        http.portal.call(http.app.state.lifetimes.lose)
        thread.join(10)
        streamed_thread.join(10)
        assert time.monotonic() - started < 5
        assert_openai_error(answered[0], 503, "restarting")
        assert answered[0].headers["retry-after"]
        assert answered[0].json()["error"]["code"] == "model_unavailable"
        # The stream had not sent its first chunk yet: it too gets the 503, not a 200 with an error event.
        assert_openai_error(streamed[0], 503, "restarting")
        assert fake.closed == 2, "both Triton streams were closed"
        fake.delay_s = 0
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


def metric(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{key}="{value}"' for key, value in labels.items())
    match = re.search(rf"^{name}(?:{{{selector}}})? ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name}{{{selector}}} not in the metrics"
    return float(match.group(1))


def test_metrics_count_requests_by_status_and_time_them():
    with client_with(FakeTriton(ANSWER)) as http:
        for _ in range(2):
            http.post("/v1/chat/completions", json=CHAT)
        http.post("/v1/chat/completions", json={**CHAT, "n": 30})
        http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True})
        http.get("/no/such/route")
        text = http.get("/metrics").text
    chat = "/v1/chat/completions"
    assert metric(text, "vlm_proxy_requests_total", route=chat, status="200") == 2
    assert metric(text, "vlm_proxy_requests_total", route=chat, status="400") == 1
    assert metric(text, "vlm_proxy_requests_total", route="other", status="404") == 1
    assert metric(text, "vlm_proxy_request_duration_seconds_count", route=chat) == 3
    assert metric(text, "vlm_proxy_time_to_first_token_seconds_count", route=chat) == 2
    assert metric(text, "vlm_proxy_time_to_first_token_seconds_count", route="/v1/completions") == 1
    assert metric(text, "vlm_proxy_requests_in_flight") == 0


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe", b"", b"[]", b'"text"'])
def test_bodies_that_are_not_a_json_object_are_400s(body):
    with client_with(FakeTriton(ANSWER)) as http:
        response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


def test_command_line_flags_reach_the_settings(monkeypatch):
    from openai_proxy.__main__ import parse_settings

    monkeypatch.setenv("VLM_API_KEY", "from-env")
    settings, _ = parse_settings(["--allow-media-network", "10.0.0.0/8", "--allow-media-network", "::1",
                                  "--max-concurrent-requests", "3", "--request-timeout-s", "9"])
    assert settings.api_key == "from-env" and settings.allowed_media_networks == ("10.0.0.0/8", "::1")
    assert settings.max_concurrent_requests == 3 and settings.request_timeout_s == 9
    assert not settings.allow_private_media_urls
    assert parse_settings(["--api-key", "flag", "--allow-private-media-urls"])[0].api_key == "flag"
    with pytest.raises(SystemExit):
        parse_settings(["--allow-media-network", "10.0.0.0/33"])
