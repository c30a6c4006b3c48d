"""The whole path on a real tritonserver: openai client -> proxy -> vlm (preprocess/vit_cache/vit, vLLM) -> back."""

from __future__ import annotations

import asyncio
import io
import os
import re
import subprocess
import sys
import time

import av
import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc
from PIL import Image

from tests.hf_reference import hf_generate
from tests.test_engine_metrics import settled_metrics
from vlmserve.media.decode import decode_video
from vlmserve.media.preprocessing import VisionPreprocessor
from launcher.lifecycle import descendants, parent_pids
from launcher.triton_server import REPO_ROOT

MAX_TOKENS = 24


def png_bytes(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mp4_bytes(frames: int = 12, fps: int = 6, size: tuple[int, int] = (84, 56)) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            rgb = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            rgb[..., i % 3] = 40 + 15 * i
            rgb[: size[1] // 2, : size[0] // 2] = 255 - 10 * i
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def stream_chat(client: openai.OpenAI, messages: list[dict], **kwargs) -> tuple[str, object, str]:
    """Streamed completion -> (text, usage, finish_reason)."""
    text, usage, finish = "", None, None
    for chunk in client.chat.completions.create(model="tiny-qwen2-vl", messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, usage, finish


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.proxy.base_url, api_key="unused", max_retries=0, timeout=120)


def test_two_images_two_turns_match_transformers(client, media_server, tiny_checkpoint):
    images = [png_bytes(84, 56, seed=1), png_bytes(56, 112, seed=2)]
    urls = [media_server.add(f"image{i}.png", data) for i, data in enumerate(images)]
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]

    user_1 = {"role": "user", "content": [
        {"type": "text", "text": "Are these images different?"},
        {"type": "image_url", "image_url": {"url": urls[0]}},
        {"type": "image_url", "image_url": {"url": urls[1]}}]}
    hf_user_1 = {"role": "user", "content": [{"type": "text", "text": "Are these images different?"},
                                             {"type": "image"}, {"type": "image"}]}
    text_1, usage_1, finish_1 = stream_chat(client, [user_1], temperature=0, max_tokens=MAX_TOKENS)
    ref_1, ref_count_1 = hf_generate(tiny_checkpoint, [hf_user_1], pil, max_new_tokens=MAX_TOKENS)
    assert text_1 == ref_1 and usage_1.completion_tokens == ref_count_1
    assert text_1 and usage_1.prompt_tokens > 0 and finish_1 in ("stop", "length")

    # Second turn reuses both images through the history, as chat clients send it.
    follow_up = {"role": "user", "content": "Describe the second one."}
    history = [user_1, {"role": "assistant", "content": text_1}, follow_up]
    text_2, usage_2, _ = stream_chat(client, history, temperature=0, max_completion_tokens=MAX_TOKENS)
    ref_2, ref_count_2 = hf_generate(tiny_checkpoint, [hf_user_1, {"role": "assistant", "content": ref_1}, follow_up],
                                     pil, max_new_tokens=MAX_TOKENS)
    assert text_2 == ref_2 and usage_2.completion_tokens == ref_count_2
    assert usage_2.prompt_tokens > usage_1.prompt_tokens


def test_text_chat_matches_transformers(client, tiny_checkpoint):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is the color of a clear sky at noon?"}]
    text, usage, _ = stream_chat(client, messages, temperature=0, max_tokens=MAX_TOKENS)
    ref, ref_count = hf_generate(tiny_checkpoint, messages, max_new_tokens=MAX_TOKENS)
    assert text == ref and usage.completion_tokens == ref_count


def test_video_with_fps_matches_transformers(client, media_server, tiny_checkpoint):
    data = mp4_bytes()
    url = media_server.add("clip.mp4", data)
    content = [{"type": "video_url", "video_url": {"url": url, "fps": 2}},
               {"type": "text", "text": "What happens in this video?"}]
    text, usage, _ = stream_chat(client, [{"role": "user", "content": content}], temperature=0,
                                 max_tokens=MAX_TOKENS)
    # The reference gets the same sampled frames (frame sampling is tested against transformers' rule
    # in test_preprocessing) and runs the untouched torch vision tower inside generate.
    frames = decode_video(data, fps=2).frames
    pixel_values, grid = VisionPreprocessor.from_pretrained(tiny_checkpoint).video(frames)
    assert grid[0] >= 2, "several temporal patches"
    hf_messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": content[1]["text"]}]}]
    ref, ref_count = hf_generate(tiny_checkpoint, hf_messages, video=(pixel_values, grid), max_new_tokens=MAX_TOKENS)
    assert text == ref and usage.completion_tokens == ref_count


def _metric(stack, name: str) -> float:
    body = httpx.get(stack.triton.metrics_url, timeout=10).text
    match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", body, re.MULTILINE)
    assert match, f"{name} not in Triton metrics"
    return float(match.group(1))


def test_eight_concurrent_streams_are_batched(stack, media_server):
    answer_tokens = 1024
    url = media_server.add("concurrent.png", png_bytes(56, 56, seed=3))
    client = openai.AsyncOpenAI(base_url=stack.proxy.base_url, api_key="unused", max_retries=0, timeout=120)

    async def one(i: int) -> tuple[str, int]:
        content = [{"type": "text", "text": f"Request number {i}: " + "tell me more " * i}]
        if i % 2:
            content.append({"type": "image_url", "image_url": {"url": url}})
        stream = await client.chat.completions.create(
            model="tiny-qwen2-vl", messages=[{"role": "user", "content": content}], stream=True,
            stream_options={"include_usage": True}, temperature=0, max_tokens=answer_tokens,
            # Answers of a fixed length that outlast the spread of the eight arrivals (an image request
            # arrives later than a text one), so the overlap does not depend on where the model stops.
            extra_body={"ignore_eos": True})
        text, usage = "", None
        async for chunk in stream:
            usage = chunk.usage or usage
            text += "".join(c.delta.content or "" for c in chunk.choices)
        return text, usage.completion_tokens

    async def run_all():
        try:
            return await asyncio.gather(*(one(i) for i in range(8)))
        finally:
            await client.close()

    steps_before = _metric(stack, "vlm_llm_steps_total")
    results = asyncio.run(run_all())
    assert [count for _, count in results] == [answer_tokens] * 8
    settled = settled_metrics(stack, steps_before)
    assert settled["vlm_llm_max_batch_size"] >= 4
    assert settled["vlm_llm_batched_sequences_total"] > settled["vlm_llm_steps_total"], \
        "some steps ran more than one sequence"


def test_bad_image_is_a_400_and_the_server_carries_on(client, media_server):
    url = media_server.add("broken.png", b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-qwen2-vl", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}])
    assert caught.value.status_code == 400 and "image" in str(caught.value).lower()
    ok = client.chat.completions.create(model="tiny-qwen2-vl", max_tokens=4, temperature=0,
                                        messages=[{"role": "user", "content": "Still there?"}])
    assert ok.choices[0].finish_reason in ("stop", "length") and ok.usage.completion_tokens > 0


def test_models_and_health(stack, client):
    triton = tritonclient.grpc.InferenceServerClient(stack.triton.grpc_url)
    assert all(triton.is_model_ready(name) for name in ("preprocess", "vit", "vit_cache", "vlm"))
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-qwen2-vl"]
    assert models[0].max_model_len == 4096  # the checkpoint's context length, reported as vLLM's server does
    assert httpx.get(stack.proxy.base_url.removesuffix("/v1") + "/health", timeout=10).status_code == 200


def test_servers_share_our_session_in_process_groups_of_their_own(stack):
    # One session, so that the kernel's autogroup does not schedule vLLM's engine as a group against the
    # proxy or the client (see launcher.processes.OWN_GROUP); a group each, so that a stop ends each whole.
    server, proxy = stack.triton.process.pid, stack.proxy.process.pid
    tree = descendants(server, parent_pids())
    assert len(tree) >= 6, "the server, a stub per model, vLLM's engine core and worker"
    for pid in (*tree, proxy):
        assert os.getsid(pid) == os.getsid(0), pid
    assert all(os.getpgid(pid) == server for pid in tree) and os.getpgid(proxy) == proxy


def test_the_engine_runs_at_a_higher_priority_than_what_carries_its_output(stack):
    # vLLM's engine core and worker keep the priority the vlm model started with; every thread of the model's
    # own process runs 10 nice values lower, and the proxy 5 (it also does each new request's first steps).
    def nice_values(pid: int) -> set[int]:
        return {os.getpriority(os.PRIO_PROCESS, int(task)) for task in os.listdir(f"/proc/{pid}/task")}

    vlm = next(stub.pid for stub in stack.triton.stub_instances().values() if stub.model == "vlm")
    engine = descendants(vlm, parent_pids()) - {vlm}
    assert engine
    engine_nice = max(set().union(*map(nice_values, engine)))
    vlm_nice, proxy_nice = nice_values(vlm), nice_values(stack.proxy.process.pid)
    assert min(vlm_nice) >= engine_nice + 10 and min(proxy_nice) >= engine_nice + 5, (engine_nice, vlm_nice, proxy_nice)


def test_grpc_command_line_client_streams_an_image_chat(stack, tmp_path):
    image = tmp_path / "local.png"
    image.write_bytes(png_bytes(56, 84, seed=4))
    result = subprocess.run(
        [sys.executable, "-m", "client.chat", "--url", stack.triton.grpc_url, "--image", str(image),
         "--max-tokens", "8", "--temperature", "0", "What is in the picture?"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_client_disconnect_frees_the_engine(stack):
    client = openai.OpenAI(base_url=stack.proxy.base_url, api_key="unused", max_retries=0)
    steps_before = _metric(stack, "vlm_llm_steps_total")
    # Far more tokens than the model writes before the stream is closed and the server notices (0.2 s).
    with httpx.stream("POST", stack.proxy.base_url + "/chat/completions", timeout=60, json={
            "model": "tiny-qwen2-vl", "stream": True, "max_tokens": 4000, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Write a very long story."}]}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith("data:")
    # Closing the stream cancels the Triton request; the vlm model aborts it in the engine.
    for _ in range(100):
        if _metric(stack, "vlm_llm_active_requests") == 0 and _metric(stack, "vlm_llm_running_requests") == 0:
            break
        time.sleep(0.1)
    assert _metric(stack, "vlm_llm_active_requests") == 0 and _metric(stack, "vlm_llm_running_requests") == 0
    assert _metric(stack, "vlm_llm_steps_total") - steps_before < 3000, "generation stopped early"
    ok = client.chat.completions.create(model="tiny-qwen2-vl", max_tokens=4, messages=[
        {"role": "user", "content": "And now?"}])
    assert ok.usage.completion_tokens > 0
