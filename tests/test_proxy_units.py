"""The OpenAI proxy without Triton: schemas, translation, media URLs, error format, SSE framing."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from client.triton_vlm import GenerationChunk, InvalidRequestError, TritonError
from openai_proxy.app import create_app, triton_client
from openai_proxy.media_fetch import MediaFetcher, MediaFetchError, decode_data_url
from openai_proxy.messages import sampling_params, to_hf_messages
from openai_proxy.schemas import ChatCompletionRequest, ImageURLPart, TextPart, UserMessage
from openai_proxy.settings import Settings

MODEL = "test-model"
SETTINGS = Settings(triton_url="127.0.0.1:1", served_model_name=MODEL, default_max_tokens=99)  # no Triton there


def chat_request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": MODEL, **fields})


def user(content) -> dict:
    return {"role": "user", "content": content}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


# --- schemas -------------------------------------------------------------------------------------


def test_message_content_may_be_a_string_or_a_list_of_parts():
    request = chat_request(messages=[user("plain"), user([{"type": "text", "text": "look"}, image("http://x/a.png")])])
    plain, parts = request.messages
    assert isinstance(plain, UserMessage) and plain.content == "plain"
    assert isinstance(parts.content[0], TextPart) and isinstance(parts.content[1], ImageURLPart)
    assert parts.content[1].image_url.detail == "auto"


def test_unknown_fields_are_ignored_and_stop_keeps_its_form():
    request = chat_request(messages=[user("hi")], stop="END", logprobs=False, some_future_option=1)
    assert request.stop == "END" and request.n == 1


@pytest.mark.parametrize("fields", [
    {"n": 2},
    {"temperature": 3},
    {"top_p": 0},
    {"messages": []},
    {"messages": [{"role": "tool", "content": "x"}]},
    {"messages": [user([{"type": "input_audio", "input_audio": {}}])]},
    {"messages": [{"role": "assistant", "content": [image("http://x/a.png")]}]},  # images only from users
])
def test_invalid_requests_fail_validation(fields):
    with pytest.raises(ValidationError):
        chat_request(**{"messages": [user("hi")], **fields})


# --- messages ------------------------------------------------------------------------------------


def test_multi_turn_translation_keeps_history_and_orders_media():
    request = chat_request(messages=[
        {"role": "developer", "content": "Be brief."},
        user([{"type": "text", "text": "Compare"}, image("http://h/1.png"), image("data:image/png;base64,AAAA")]),
        {"role": "assistant", "content": "They differ."},
        user([{"type": "video_url", "video_url": {"url": "http://h/v.mp4", "fps": 4}},
              {"type": "video_url", "video_url": {"url": "http://h/w.mp4"}}, {"type": "text", "text": "And these?"}]),
    ])
    messages, urls = to_hf_messages(request.messages, default_video_fps=2.0)
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [{"type": "video", "fps": 4.0}, {"type": "video", "fps": 2.0},
                                     {"type": "text", "text": "And these?"}]},
    ]
    assert urls == ["http://h/1.png", "data:image/png;base64,AAAA", "http://h/v.mp4", "http://h/w.mp4"]


def test_sampling_params_map_openai_names_and_leave_unset_ones_out():
    request = chat_request(messages=[user("hi")], max_tokens=10, max_completion_tokens=20, temperature=0,
                           top_k=5, seed=7, stop="END", frequency_penalty=0.5)
    assert sampling_params(request, default_max_tokens=99) == {
        "max_tokens": 20, "temperature": 0, "top_k": 5, "seed": 7, "stop": ["END"], "frequency_penalty": 0.5}
    assert sampling_params(chat_request(messages=[user("hi")], max_tokens=10), 99) == {"max_tokens": 10}
    assert sampling_params(chat_request(messages=[user("hi")], stop=["a", "b"]), 99) == {"max_tokens": 99,
                                                                                         "stop": ["a", "b"]}


# --- media URLs ----------------------------------------------------------------------------------


def test_data_urls_decode_base64_and_percent_encoding():
    assert decode_data_url("data:image/png;base64,aGVsbG8=", max_bytes=100) == b"hello"
    assert decode_data_url("data:text/plain,a%20b", max_bytes=100) == b"a b"


@pytest.mark.parametrize("url, reason", [
    ("data:image/png;base64,not*base64!", "base64"),
    ("data:image/png;base64,aGVsbG8", "base64"),  # bad padding
    ("data:image/png;base64", "malformed"),
    ("data:image/png;base64," + "A" * 200, "limit"),
])
def test_bad_data_urls_say_why(url, reason):
    with pytest.raises(MediaFetchError, match=reason):
        decode_data_url(url, max_bytes=100)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://host/a.png", "a.png"])
def test_only_http_and_data_urls_are_fetched(url):
    async def fetch():
        async with MediaFetcher(max_bytes=100, timeout_s=5) as fetcher:
            await fetcher.fetch(url)

    with pytest.raises(MediaFetchError, match="only http"):
        asyncio.run(fetch())


def test_http_fetch_in_order_with_size_limit_and_status_check(media_server):
    small, large = media_server.add("small.bin", b"\x00" * 10), media_server.add("large.bin", b"\x01" * 1000)

    async def fetch_all(urls: list[str]) -> list[bytes]:
        async with MediaFetcher(max_bytes=100, timeout_s=5) as fetcher:
            return await fetcher.fetch_all(urls)

    assert asyncio.run(fetch_all([small, "data:,x", small])) == [b"\x00" * 10, b"x", b"\x00" * 10]
    with pytest.raises(MediaFetchError, match="limit"):
        asyncio.run(fetch_all([small, large]))
    with pytest.raises(MediaFetchError, match="HTTP 404"):
        asyncio.run(fetch_all([small.replace("small", "missing")]))


# --- HTTP errors (nothing reaches Triton) --------------------------------------------------------


@pytest.fixture
def http():
    with TestClient(create_app(SETTINGS)) as client:
        yield client


def assert_openai_error(response, status: int, message_part: str, param: str | None = None) -> None:
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message_part in error["message"] and error["param"] == param
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")


def test_malformed_json_is_a_400(http):
    response = http.post("/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert_openai_error(response, 400, "not valid JSON")


def test_n_above_one_is_a_400(http):
    response = http.post("/v1/chat/completions", json={"model": MODEL, "n": 2, "messages": [user("hi")]})
    assert_openai_error(response, 400, "only n=1", param="n")


def test_validation_errors_are_400_not_422(http):
    response = http.post("/v1/chat/completions", json={"model": MODEL, "temperature": 9, "messages": [user("hi")]})
    assert_openai_error(response, 400, "temperature", param="temperature")
    assert_openai_error(http.post("/v1/chat/completions", json={"model": MODEL}), 400, "Field required",
                        param="messages")


def test_unknown_model_is_a_404(http):
    response = http.post("/v1/chat/completions", json={"model": "other", "messages": [user("hi")]})
    assert_openai_error(response, 404, "other", param="model")
    assert response.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("url, message_part", [
    ("data:image/png;base64,@@@", "base64"),
    ("file:///etc/passwd", "only http"),
])
def test_bad_media_urls_are_400s(http, url, message_part):
    response = http.post("/v1/chat/completions", json={"model": MODEL, "stream": True,
                                                       "messages": [user([image(url)])]})
    assert_openai_error(response, 400, message_part, param="messages")


def test_models_health_and_unknown_routes(http):
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [MODEL]
    assert http.get("/health").status_code == 503
    assert_openai_error(http.get("/v1/nothing"), 404, "Not Found")


# --- responses, with a stand-in for Triton -------------------------------------------------------


class FakeTriton:
    """Streams fixed chunks, then raises `error` if one is given."""

    def __init__(self, chunks: list[GenerationChunk], error: Exception | None = None) -> None:
        self.chunks, self.error, self.calls = chunks, error, []

    async def generate(self, messages, media, sampling, request_id):
        self.calls.append((messages, media, sampling, request_id))
        for chunk in self.chunks:
            yield chunk
        if self.error is not None:
            raise self.error


ANSWER = [GenerationChunk("Hel", None, 5, 1), GenerationChunk("lo", None, 5, 2), GenerationChunk("", "stop", 5, 3)]


def client_with(fake: FakeTriton):
    app = create_app(SETTINGS)
    app.dependency_overrides[triton_client] = lambda: fake
    return TestClient(app)


def sse_payloads(response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_stream_sends_role_deltas_finish_usage_and_done():
    fake = FakeTriton(ANSWER)
    with client_with(fake) as http:
        response = http.post("/v1/chat/completions", json={
            "model": MODEL, "stream": True, "stream_options": {"include_usage": True}, "messages": [
                user([{"type": "text", "text": "hi"}, image("data:image/png;base64,aGk=")])]})
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["Hel", "lo"]
    assert chunks[3]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}
    assert chunks[4]["choices"] == [] and chunks[4]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3,
                                                                 "total_tokens": 8}
    messages, media, sampling, request_id = fake.calls[0]
    assert media == [b"hi"] and sampling == {"max_tokens": 99} and request_id == chunks[0]["id"]


def test_stream_without_include_usage_has_no_usage():
    with client_with(FakeTriton(ANSWER)) as http:
        payloads = sse_payloads(http.post("/v1/chat/completions", json={
            "model": MODEL, "stream": True, "messages": [user("hi")]}))
    assert all("usage" not in json.loads(p) for p in payloads[:-1])


def test_non_streamed_completion_has_text_and_usage():
    with client_with(FakeTriton(ANSWER)) as http:
        body = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [user("hi")]}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                                "finish_reason": "stop", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


@pytest.mark.parametrize("stream", [False, True])
def test_a_rejection_before_any_output_is_an_http_400(stream):
    with client_with(FakeTriton([], InvalidRequestError("prompt too long"))) as http:
        response = http.post("/v1/chat/completions", json={"model": MODEL, "stream": stream,
                                                           "messages": [user("hi")]})
    assert_openai_error(response, 400, "prompt too long")


def test_an_error_mid_stream_is_the_last_event():
    with client_with(FakeTriton(ANSWER[:1], TritonError("engine died"))) as http:
        payloads = sse_payloads(http.post("/v1/chat/completions", json={
            "model": MODEL, "stream": True, "messages": [user("hi")]}))
    assert "[DONE]" not in payloads
    error = json.loads(payloads[-1])["error"]
    assert "engine died" in error["message"] and error["type"] == "server_error"
