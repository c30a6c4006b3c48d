"""The OpenAI proxy without Triton: schemas, translation, data URLs, error format, SSE framing."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from client.triton_vlm import InvalidRequestError, TritonError
from openai_proxy.app import create_app
from openai_proxy.chat_schemas import ChatCompletionRequest, ImageURLPart, TextPart, UserMessage
from openai_proxy.completion_schemas import CompletionRequest
from openai_proxy.media_fetch import MediaFetcher, MediaFetchError, decode_data_url
from openai_proxy.messages import sampling_params, to_hf_messages
from tests.proxy_helpers import (
    ANSWER,
    MODEL,
    SETTINGS,
    FakeTriton,
    assert_openai_error,
    client_with,
    image,
    sse_payloads,
    user,
)


def chat_request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": MODEL, **fields})


# --- schemas -------------------------------------------------------------------------------------


def test_message_content_may_be_a_string_or_a_list_of_parts():
    request = chat_request(messages=[user("plain"), user([{"type": "text", "text": "look"}, image("http://x/a.png")])])
    plain, parts = request.messages
    assert isinstance(plain, UserMessage) and plain.content == "plain"
    assert isinstance(parts.content[0], TextPart) and isinstance(parts.content[1], ImageURLPart)
    assert parts.content[1].image_url.detail == "auto"


def test_openai_fields_that_ask_for_nothing_are_accepted_and_stop_keeps_its_form():
    request = chat_request(messages=[user("hi")], stop="END", logprobs=False, n=1, tools=[], tool_choice="none",
                           response_format={"type": "text"}, user="u1", metadata={"k": "v"}, store=False,
                           stream=None, seed=None, top_logprobs=None)
    assert request.stop == "END" and request.stop_list() == ["END"]


def test_unknown_fields_are_rejected_as_openai_does():
    with pytest.raises(ValidationError, match="Extra inputs"):
        chat_request(messages=[user("hi")], some_future_option=1)
    with pytest.raises(ValidationError, match="Extra inputs"):
        chat_request(messages=[{"role": "user", "content": "hi", "cache_control": {}}])


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("fields, reason", [
    ({"n": 17}, "less than or equal to 16"),
    ({"n": 0}, "greater than or equal to 1"),
    ({"logprobs": True, "top_logprobs": 21}, "less than or equal to 20"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "not among the tools"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [TOOL, TOOL]}, "same name"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "pattern"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a+"}}, "only one of"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
    ({"functions": [{"name": "f"}]}, "deprecated"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "up to 4"),
    ({"stop": ""}, "non-empty"),
    ({"stream_options": {"include_usage": True}}, "only allowed when stream"),
    ({"seed": -1}, "greater than or equal"),
])
def test_what_the_server_cannot_honour_is_refused_with_a_reason(fields, reason):
    with pytest.raises(ValidationError, match=reason):
        chat_request(**{"messages": [user("hi")], **fields})


def test_text_completion_prompt_is_one_string():
    assert CompletionRequest.model_validate({"model": MODEL, "prompt": ["Once"]}).prompt == "Once"
    for prompt in (["a", "b"], [1, 2, 3], [[1, 2]], []):
        with pytest.raises(ValidationError, match="prompt must be a string"):
            CompletionRequest.model_validate({"model": MODEL, "prompt": prompt})
    for field, value in (("logprobs", 21), ("best_of", 2), ("suffix", "end")):
        with pytest.raises(ValidationError, match=field):
            CompletionRequest.model_validate({"model": MODEL, "prompt": "x", field: value})
    with pytest.raises(ValidationError, match="echo with logprobs"):
        CompletionRequest.model_validate({"model": MODEL, "prompt": "x", "echo": True, "logprobs": 1})


# --- messages ------------------------------------------------------------------------------------


def test_multi_turn_translation_keeps_history_and_orders_media():
    request = chat_request(messages=[
        {"role": "developer", "content": "Be brief."},
        user([{"type": "text", "text": "Compare"}, image("http://h/1.png"), image("data:image/png;base64,AAAA")]),
        {"role": "assistant", "content": "They differ."},
        user([{"type": "video_url", "video_url": {"url": "http://h/v.mp4", "fps": 4}},
              {"type": "video_url", "video_url": {"url": "http://h/w.mp4"}}, {"type": "text", "text": "And these?"}]),
    ])
    messages, urls = to_hf_messages(request.messages)
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": "They differ."},
        # A video without fps goes without: the server's --video-fps applies.
        {"role": "user", "content": [{"type": "video", "fps": 4.0}, {"type": "video"},
                                     {"type": "text", "text": "And these?"}]},
    ]
    assert urls == ["http://h/1.png", "data:image/png;base64,AAAA", "http://h/v.mp4", "http://h/w.mp4"]


def test_sampling_params_map_openai_names_and_leave_unset_ones_out():
    request = chat_request(messages=[user("hi")], temperature=0, top_k=5, seed=7, stop="END", frequency_penalty=0.5)
    assert sampling_params(request, max_tokens=20) == {
        "max_tokens": 20, "temperature": 0, "top_k": 5, "seed": 7, "stop": ["END"], "frequency_penalty": 0.5}
    assert sampling_params(chat_request(messages=[user("hi")]), 10) == {"max_tokens": 10}
    # What the client left unset stays unset: the server's defaults apply.
    assert sampling_params(chat_request(messages=[user("hi")], logprobs=False), None) == {}
    vllm_style = chat_request(messages=[user("hi")], top_k=-1, min_p=0.05, repetition_penalty=1.1)
    assert sampling_params(vllm_style, 10) == {"max_tokens": 10, "top_k": 0, "min_p": 0.05,
                                               "repetition_penalty": 1.1}
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


# --- HTTP errors (no generation reaches Triton) ----------------------------------------------------


@pytest.fixture
def http():
    fake = FakeTriton([], ready=False)  # it says which model it serves, and nothing more
    with client_with(fake) as client:
        yield client
    assert not fake.calls


def test_malformed_json_is_a_400(http):
    response = http.post("/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert_openai_error(response, 400, "not valid JSON")


def test_n_over_the_limit_is_a_400(http):
    response = http.post("/v1/chat/completions", json={"model": MODEL, "n": 17, "messages": [user("hi")]})
    assert_openai_error(response, 400, "less than or equal to 16", param="n")


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
    assert chunks[4]["choices"] == [] and chunks[4]["usage"] == {
        "prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, "prompt_tokens_details": {"cached_tokens": 0}}
    messages, media, sampling, request_id = fake.calls[0]
    assert media == [b"hi"] and sampling == {} and request_id == chunks[0]["id"] + "-0"


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
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 0}}


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


def test_text_completion_whole_and_streamed():
    fake = FakeTriton(ANSWER)
    with client_with(fake) as http:
        body = http.post("/v1/completions", json={"model": MODEL, "prompt": ["Once upon"], "max_tokens": 7,
                                                  "stop": "END"}).json()
        payloads = sse_payloads(http.post("/v1/completions", json={
            "model": MODEL, "prompt": "Once upon", "stream": True, "stream_options": {"include_usage": True}}))
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "Hello", "finish_reason": "stop", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert fake.calls[0][:2] == ("Once upon", {"max_tokens": 7, "stop": ["END"]})
    assert fake.calls[1][1] == {"max_tokens": 16}, "OpenAI's default max_tokens for text completions"
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["text"] for c in chunks[:3]] == ["Hel", "lo", ""]
    assert chunks[2]["choices"][0]["finish_reason"] == "stop" and chunks[3]["choices"] == []
    assert chunks[3]["usage"]["total_tokens"] == 8


def test_text_that_is_not_unicode_is_refused_before_triton():
    from client.triton_vlm import TritonVLMClient

    async def generate():
        async with TritonVLMClient("127.0.0.1:1") as client:  # nothing listens there: never reached
            async for _ in client.generate_text("bad \ud800 surrogate", {}, request_id="x"):
                pass

    with pytest.raises(InvalidRequestError, match="unpaired surrogate"):
        asyncio.run(generate())
