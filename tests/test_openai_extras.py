"""What OpenAI clients ask for beyond plain text, through the unmodified `openai` client on the real stack:
structured output, tool calls, logprobs, n choices, cached tokens, min_tokens / ignore_eos."""

from __future__ import annotations

import json
import math
import re

import jsonschema
import openai
import pytest

from tests.conftest import running_stack
from tests.test_end_to_end import png_bytes

MODEL = "tiny-qwen2-vl"
ASK = [{"role": "user", "content": "Describe the weather as JSON."}]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["sky", "hours"],
          "properties": {"sky": {"enum": ["clear", "cloudy", "rain"]},
                         "hours": {"type": "integer", "minimum": 0, "maximum": 24}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.proxy.base_url, api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, stream: bool, **kwargs) -> dict:
    """One choice's message, finish reason and logprobs, the same way whether streamed or not: a stream's
    deltas are put together as an OpenAI client library would."""
    kwargs = {"model": MODEL, "messages": ASK, "max_tokens": 64, "temperature": 0, **kwargs}
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in choice.message.tool_calls or []]
        logprobs = choice.logprobs.content if choice.logprobs else None
        return {"content": choice.message.content, "tool_calls": calls, "finish_reason": choice.finish_reason,
                "logprobs": logprobs}
    content, calls, logprobs, finish = None, {}, None, None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                content = (content or "") + delta.content
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["name"] = call.function.name or entry["name"]
                entry["arguments"] += call.function.arguments or ""
            if choice.logprobs and choice.logprobs.content:
                logprobs = (logprobs or []) + choice.logprobs.content
            finish = choice.finish_reason or finish
    return {"content": content, "tool_calls": [calls[i] for i in sorted(calls)], "finish_reason": finish,
            "logprobs": logprobs}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_schema_output_parses_and_validates(client, stream):
    answer = chat(client, stream, response_format={"type": "json_schema",
                                                   "json_schema": {"name": "weather", "schema": SCHEMA}})
    assert answer["finish_reason"] == "stop"
    jsonschema.validate(json.loads(answer["content"]), SCHEMA)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_object_and_the_choice_and_regex_extensions(client, stream):
    assert isinstance(json.loads(chat(client, stream, response_format={"type": "json_object"})["content"]), dict)
    choice = chat(client, stream, temperature=1, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice["content"] in ("yes", "no")
    regex = chat(client, stream, temperature=1, extra_body={"structured_outputs": {"regex": "[a-c]{2}-[0-9]{3}"}})
    assert re.fullmatch("[a-c]{2}-[0-9]{3}", regex["content"])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_forced_tool_call_comes_back_as_tool_calls_with_arguments_that_parse(client, stream):
    named = chat(client, stream, tools=[WEATHER, CLOCK],
                 tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named["content"] is None and len(named["tool_calls"]) == 1
    call = named["tool_calls"][0]
    assert call["name"] == "get_time" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["arguments"]), CLOCK["function"]["parameters"])

    # One call: random weights would go on adding calls to the list until max_tokens.
    required = chat(client, stream, tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False)
    assert required["finish_reason"] == "tool_calls" and len(required["tool_calls"]) == 1
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, CLOCK)}
    for call in required["tool_calls"]:
        jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])


def test_a_tool_conversation_goes_back_into_the_prompt(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=8)
    # The history (tool description, the call, its result) is in the prompt: it is longer than the question.
    alone = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8)
    assert answer.usage.prompt_tokens > alone.usage.prompt_tokens + 60
    with pytest.raises(openai.BadRequestError, match="JSON object"):
        bad = {**call, "function": {"name": "get_weather", "arguments": "not json"}}
        client.chat.completions.create(model=MODEL, messages=[*ASK, {"role": "assistant", "tool_calls": [bad]}])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_logprobs_are_finite_and_match_the_returned_tokens(client, stream):
    answer = chat(client, stream, logprobs=True, top_logprobs=3, max_tokens=12)
    entries = answer["logprobs"]
    assert entries and all(math.isfinite(e.logprob) and e.logprob <= 0 for e in entries)
    # Each token's bytes, put together, are the text (a token may hold part of a character; random weights
    # also write bytes that never make one, which the text shows as U+FFFD).
    assert b"".join(bytes(e.bytes) for e in entries).decode(errors="replace") == answer["content"]
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(math.isfinite(v) for v in values)
        # Greedy: the token chosen is the most likely one.
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob


def test_text_completion_logprobs_echo_and_n(client):
    completion = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=6, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == len(logprobs.top_logprobs)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    echoed = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=6, temperature=0, echo=True, n=2)
    assert [c.index for c in echoed.choices] == [0, 1]
    assert all(c.text == "Once upon" + completion.choices[0].text for c in echoed.choices)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_n_3_gives_three_choices(client, stream):
    kwargs = {"model": MODEL, "messages": ASK, "max_tokens": 16, "n": 3, "temperature": 1, "seed": 7}
    if stream:
        texts, finishes = ["", "", ""], [None, None, None]
        for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
                finishes[choice.index] = choice.finish_reason or finishes[choice.index]
            usage = chunk.usage or None
        assert all(finishes)
    else:
        completion = client.chat.completions.create(**kwargs)
        assert [c.index for c in completion.choices] == [0, 1, 2]
        texts, usage = [c.message.content for c in completion.choices], completion.usage
    assert len(set(texts)) == 3, "each choice samples on its own"
    single = client.chat.completions.create(**{**kwargs, "n": 1})
    assert usage.prompt_tokens == single.usage.prompt_tokens and usage.completion_tokens > single.usage.completion_tokens


def test_min_tokens_and_ignore_eos(client):
    ignored = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, extra_body={"ignore_eos": True})
    assert ignored.usage.completion_tokens == 40 and ignored.choices[0].finish_reason == "length"
    at_least = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, extra_body={"min_tokens": 30})
    assert at_least.usage.completion_tokens >= 30


def two_image_turns(client: openai.OpenAI, media_server) -> tuple[int, int, int]:
    """cached_tokens of the first and the second turn of a chat about two images, and the first's prompt tokens."""
    urls = [media_server.add(f"cache-{i}.png", png_bytes(280, 280, seed=40 + i)) for i in range(2)]
    user = {"role": "user", "content": [{"type": "text", "text": "Compare these."},
                                        *({"type": "image_url", "image_url": {"url": url}} for url in urls)]}
    first = client.chat.completions.create(model=MODEL, messages=[user], max_tokens=8, temperature=0)
    history = [user, {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "Which one is brighter?"}]
    second = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0)
    return (first.usage.prompt_tokens_details.cached_tokens, second.usage.prompt_tokens_details.cached_tokens,
            first.usage.prompt_tokens)


def test_the_second_turn_of_a_two_image_chat_reports_cached_tokens(stack, media_server):
    first, second, first_prompt = two_image_turns(openai.OpenAI(base_url=stack.proxy.base_url, api_key="unused"),
                                                  media_server)
    # The first turn may find the chat template's opening in the cache (vLLM's blocks are 128 tokens here);
    # the second finds most of the first turn, images included.
    assert first < first_prompt // 2 <= second


def test_no_cached_tokens_with_the_prefix_cache_off(tiny_checkpoint, tmp_path, media_server):
    with running_stack(tiny_checkpoint, tmp_path, enable_prefix_caching=False) as stack:
        client = openai.OpenAI(base_url=stack.proxy.base_url, api_key="unused")
        assert two_image_turns(client, media_server)[:2] == (0, 0)
