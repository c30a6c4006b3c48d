"""The official `openai` client against the real stack: README examples, sync and async, streamed and not."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import re

import openai
import pytest

from tests.hf_reference import hf_generate_text
from tests.test_end_to_end import mp4_bytes, png_bytes
from launcher.triton_server import REPO_ROOT

MODEL = "tiny-qwen2-vl"


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.proxy.base_url, api_key="EMPTY", max_retries=0, timeout=120)


def readme_python_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.DOTALL)


def test_readme_python_example_runs_unchanged(stack, media_server):
    """The README's code, with only its addresses pointed at the test stack and local files."""
    (example,) = readme_python_examples()
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(56, 56, seed=11)).decode()
    code = (example.replace("http://127.0.0.1:8000/v1", stack.proxy.base_url)
            .replace("https://example.com/a.jpg", media_server.add("readme-a.png", png_bytes(84, 56, seed=10)))
            .replace("data:image/png;base64,iVBORw0...", data_url))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    assert printed.getvalue().strip()


def test_sync_client_whole_completion_with_system_prompt_and_image_detail(client, media_server):
    url = media_server.add("detail.png", png_bytes(56, 84, seed=12))
    completion = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, seed=1, messages=[
        {"role": "system", "content": "You describe pictures."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]}])
    assert completion.object == "chat.completion" and completion.model == MODEL
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and completion.usage.completion_tokens <= 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_async_client_streams_the_mission_video_example(stack, media_server):
    """MISSION.md's video part, `{"type": "video_url", "video_url": {"url": ..., "fps": 2}}`, streamed."""
    url = media_server.add("mission.mp4", mp4_bytes())

    async def run() -> tuple[str, object, str]:
        async with openai.AsyncOpenAI(base_url=stack.proxy.base_url, api_key="EMPTY", max_retries=0) as aclient:
            stream = await aclient.chat.completions.create(
                model=MODEL, stream=True, stream_options={"include_usage": True}, max_completion_tokens=12,
                temperature=0.1, top_p=0.9, frequency_penalty=0.5, messages=[{"role": "user", "content": [
                    {"type": "video_url", "video_url": {"url": url, "fps": 2}},
                    {"type": "text", "text": "What happens in this video?"}]}])
            text, usage, finish = "", None, None
            async for chunk in stream:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    finish = choice.finish_reason or finish
            return text, usage, finish

    text, usage, finish = asyncio.run(run())
    assert finish in ("stop", "length") and usage.completion_tokens > 0 and usage.prompt_tokens > 20


def test_text_completions_match_transformers_whole_and_streamed(stack, client, tiny_checkpoint):
    prompt = "Once upon a time, in a land far away,"
    expected, count = hf_generate_text(tiny_checkpoint, prompt, max_new_tokens=10)

    async def whole():
        async with openai.AsyncOpenAI(base_url=stack.proxy.base_url, api_key="EMPTY", max_retries=0) as aclient:
            return await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)

    completion = asyncio.run(whole())
    assert completion.object == "text_completion"
    assert completion.choices[0].text == expected and completion.usage.completion_tokens == count

    pieces, usage = [], None
    for chunk in client.completions.create(model=MODEL, prompt=[prompt], max_tokens=10, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        pieces += [choice.text for choice in chunk.choices]
    assert "".join(pieces) == expected and usage.completion_tokens == count
    assert usage.prompt_tokens == completion.usage.prompt_tokens


def test_stop_strings_end_the_answer_with_finish_reason_stop(client):
    greedy = client.completions.create(model=MODEL, prompt="The list:", max_tokens=12, temperature=0)
    text = greedy.choices[0].text
    stop = text[len(text) // 2:][:3]
    if not stop.strip():
        pytest.skip("the greedy answer has no usable stop string")
    stopped = client.completions.create(model=MODEL, prompt="The list:", max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text
    assert text.startswith(stopped.choices[0].text)


def test_vllm_sampling_extensions_reach_the_engine(client):
    # Long enough for the tiny checkpoint's greedy answer to repeat itself, which the penalty must change.
    messages = [{"role": "user", "content": "Name three colours, then three more colours."}]
    greedy = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0)
    # min_p 1 keeps only the most likely token: sampling at temperature 1 must give the greedy answer.
    only_top = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=1, seed=3,
                                              extra_body={"min_p": 1.0, "top_k": -1})
    assert only_top.choices[0].message.content == greedy.choices[0].message.content
    penalized = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0,
                                               extra_body={"repetition_penalty": 2.0})
    assert penalized.choices[0].message.content != greedy.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="min_p"):
        client.chat.completions.create(model=MODEL, messages=messages, extra_body={"min_p": 1.5})


def test_the_client_raises_openai_errors(client):
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=MODEL, top_logprobs=2, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="less than or equal to 16"):
        client.chat.completions.create(model=MODEL, n=17, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=MODEL, prompt="word " * 5000, max_tokens=4)
    assert [m.id for m in client.models.list()] == [MODEL]
