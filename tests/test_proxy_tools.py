"""Tool calling in the proxy, without Triton: the prompt it renders, and answers parsed into tool_calls,
whole and streamed (a stand-in Triton plays the model's text)."""

from __future__ import annotations

import json

from client.triton_vlm import GenerationChunk
from openai_proxy.chat_schemas import ChatCompletionRequest
from openai_proxy.messages import to_hf_messages
from openai_proxy.tools import parse_calls
from tests.proxy_helpers import MODEL, FakeTriton, client_with, sse_payloads

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL_TEXT = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'


def pieces(text: str, size: int = 4) -> list[GenerationChunk]:
    """The text as the model streams it, a few characters at a time, ending with "stop"."""
    parts = [text[i:i + size] for i in range(0, len(text), size)]
    return [GenerationChunk(part, None, 7, i + 1) for i, part in enumerate(parts)] + \
        [GenerationChunk("", "stop", 7, len(parts))]


def test_tools_are_described_in_the_system_message_and_a_tool_turn_is_rendered_as_qwen_does():
    request = ChatCompletionRequest.model_validate({"model": MODEL, "tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "24 C"}]})
    messages, urls = to_hf_messages(request.messages, request.tools)
    assert urls == [] and [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("You are a helpful assistant.\n\n# Tools")
    assert json.dumps(WEATHER) in messages[0]["content"]
    assert messages[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n'
                                      '</tool_call>')
    assert messages[3]["content"] == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\n24 C\n</tool_response>"


def test_calls_are_parsed_from_an_answer_and_a_broken_one_stays_text():
    content, calls = parse_calls(CALL_TEXT)
    assert content == "Let me check." and [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Rome"})]
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_calls(broken) == (broken, []) and parse_calls("no call") == ("no call", [])


def test_an_auto_tool_call_comes_back_as_tool_calls_whole_and_streamed():
    body = {"model": MODEL, "tools": [WEATHER], "messages": [{"role": "user", "content": "Weather?"}]}
    with client_with(FakeTriton(pieces(CALL_TEXT))) as http:
        whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]
        chunks = [json.loads(p) for p in sse_payloads(http.post("/v1/chat/completions", json={**body, "stream": True}))
                  if p != "[DONE]"]
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] == "Let me check."
    assert json.loads(whole["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Rome"}
    deltas = [c["choices"][0]["delta"] for c in chunks]
    # Content streams until a call may begin; no piece of the call markup leaks into it.
    assert "".join(d.get("content", "") for d in deltas) == "Let me check."
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_text_that_only_looks_like_the_start_of_a_call_is_streamed_in_the_end():
    body = {"model": MODEL, "tools": [WEATHER], "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    with client_with(FakeTriton(pieces("a < b <tool", size=3))) as http:
        chunks = [json.loads(p) for p in sse_payloads(http.post("/v1/chat/completions", json=body)) if p != "[DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "a < b <tool"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
