"""The served ViT path: dedupe, the shared embedding cache, eviction, and cached == fresh outputs.

Counts are deltas: the session `stack` is shared with other tests, and every test here uses images
no other test sends. Eviction runs on one extra small server: only a `vit_cache` model, with a
budget of about one image.
"""

from __future__ import annotations

import asyncio
import re
import shutil

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient

from tests.test_end_to_end import mp4_bytes, png_bytes
from vlmserve.media.preprocessing import VisionPreprocessor
from vlmserve.vit.packing import MAX_PATCHES_PER_CALL, pack_vit_calls, split_embeddings

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny-qwen2-vl"
# The tiny ViT emits 64 floats per token: a 112x112 image (16 tokens) is 4096 + 24 bytes, so this
# budget holds one such image but not two, and never a 224x224 one (64 tokens).
SMALL_BUDGET = 6144


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(stack, messages: list[dict]) -> str:
    client = openai.OpenAI(base_url=stack.proxy.base_url, api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    return reply.choices[0].message.content


def vit_executions(stack) -> int:
    with grpcclient.InferenceServerClient(stack.triton.grpc_url) as triton:
        return triton.get_inference_statistics("vit").model_stats[0].execution_count


def metric(server, name: str) -> float:
    body = httpx.get(server.metrics_url, timeout=10).text
    match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", body, re.MULTILINE)
    assert match, f"{name} not in Triton metrics"
    return float(match.group(1))


def test_same_image_twice_in_a_request_two_turns_and_two_users_is_encoded_once(stack, media_server):
    url = media_server.add("service-dedupe.png", png_bytes(84, 56, seed=101))
    before, hits_before = vit_executions(stack), metric(stack.triton, "vlm_vit_cache_hits_total")
    turn_1 = [{"role": "user", "content": [{"type": "text", "text": "Same?"}, image_part(url), image_part(url)]}]
    answer = chat(stack, turn_1)
    assert vit_executions(stack) - before == 1, "one ViT call for the two copies"
    chat(stack, [*turn_1, {"role": "assistant", "content": answer}, {"role": "user", "content": "And now?"}])
    chat(stack, [{"role": "user", "content": [image_part(url), {"type": "text", "text": "Another user."}]}])
    assert vit_executions(stack) - before == 1
    assert metric(stack.triton, "vlm_vit_cache_hits_total") - hits_before == 2  # turn 2 and the other user


def test_video_in_two_turns_is_encoded_once(stack, media_server):
    url = media_server.add("service-clip.mp4", mp4_bytes(frames=14, size=(112, 56)))
    video = {"type": "video_url", "video_url": {"url": url, "fps": 2}}
    before = vit_executions(stack)
    turn_1 = [{"role": "user", "content": [video, {"type": "text", "text": "What happens?"}]}]
    answer = chat(stack, turn_1)
    first_turn_calls = vit_executions(stack) - before  # frames beyond one call's patch budget: more calls
    assert first_turn_calls >= 1
    chat(stack, [*turn_1, {"role": "assistant", "content": answer}, {"role": "user", "content": "Then?"}])
    assert vit_executions(stack) - before == first_turn_calls
    # Another fps samples other frames: another entry.
    chat(stack, [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url, "fps": 4}}]}])
    assert vit_executions(stack) - before > first_turn_calls


def test_concurrent_requests_for_one_new_image_share_one_encoding(stack, media_server):
    url = media_server.add("service-concurrent.png", png_bytes(112, 112, seed=102))
    client = openai.AsyncOpenAI(base_url=stack.proxy.base_url, api_key="unused", max_retries=0, timeout=120)

    async def run_all() -> list[str]:
        async def one(i: int) -> str:
            reply = await client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[
                {"role": "user", "content": [image_part(url), {"type": "text", "text": f"User {i}."}]}])
            return reply.choices[0].message.content

        try:
            return await asyncio.gather(*(one(i) for i in range(4)))
        finally:
            await client.close()

    before = vit_executions(stack)
    assert all(asyncio.run(run_all()))
    assert vit_executions(stack) - before == 1


def encode_directly(stack, data: bytes, merge_size: int) -> np.ndarray:
    """preprocess -> vit straight through Triton, bypassing vlm and the cache."""
    with grpcclient.InferenceServerClient(stack.triton.grpc_url) as triton:
        inputs = []
        for name, value in (("MEDIA", data), ("KIND", b"image")):
            inputs.append(grpcclient.InferInput(name, [1], "BYTES"))
            inputs[-1].set_data_from_numpy(np.array([value], dtype=np.object_))
        pre = triton.infer("preprocess", inputs)
        pixels, grid = pre.as_numpy("PIXEL_VALUES"), pre.as_numpy("GRID_THW")
        outputs = []
        for call in pack_vit_calls([pixels], [grid], merge_size, MAX_PATCHES_PER_CALL):
            vit_in = []
            for name, array in call.items():
                vit_in.append(grpcclient.InferInput(name, list(array.shape), "FP32" if name == "pixel_values" else "INT64"))
                vit_in[-1].set_data_from_numpy(array)
            outputs.append(triton.infer("vit", vit_in).as_numpy("image_embeds"))
        return split_embeddings(outputs, [grid], merge_size)[0]


def cached_embeddings(server, key: str) -> np.ndarray | None:
    with grpcclient.InferenceServerClient(server.grpc_url) as triton:
        key_input = grpcclient.InferInput("KEY", [1], "BYTES")
        key_input.set_data_from_numpy(np.array([key.encode()], dtype=np.object_))
        result = triton.infer("vit_cache", [key_input])
        return result.as_numpy("EMBEDS") if result.as_numpy("FOUND")[0] else None


def test_cached_embeddings_are_the_fresh_ones_bit_for_bit(stack, media_server, tiny_checkpoint):
    data = png_bytes(140, 98, seed=103)
    url = media_server.add("service-identity.png", data)
    messages = [{"role": "user", "content": [image_part(url), {"type": "text", "text": "Describe it."}]}]
    fresh_text = chat(stack, messages)  # a miss: encoded, then stored
    assert chat(stack, messages) == fresh_text  # a hit
    preprocessor = VisionPreprocessor.from_pretrained(tiny_checkpoint)
    settings = preprocessor.media_settings()  # the session stack sets no overrides
    key = settings.cache_key(data, settings.resolve({"type": "image"}))
    cached = cached_embeddings(stack.triton, key)
    assert cached is not None
    np.testing.assert_array_equal(cached, encode_directly(stack, data, preprocessor.merge_size))


@pytest.fixture(scope="module")
def small_cache_server(tiny_checkpoint, tmp_path_factory):
    """tritonserver with only a `vit_cache` of SMALL_BUDGET bytes: the served model, loaded in seconds."""
    from export.generate_repository import RepositoryOptions, generate_repository
    from launcher.triton_server import TritonPorts, TritonServer

    workdir = tmp_path_factory.mktemp("small-cache")
    onnx = workdir / "vit.onnx"
    onnx.write_bytes(b"unused")
    repository = generate_repository(RepositoryOptions(checkpoint=tiny_checkpoint, out=workdir / "repository",
                                                       vit_onnx=onnx, vit_cache_mb=SMALL_BUDGET / 2**20))
    for model in repository.iterdir():
        if model.name != "vit_cache":
            shutil.rmtree(model)
    server = TritonServer(repository, workdir / "tritonserver", TritonPorts.free(),
                          log_path=workdir / "tritonserver.log")
    server.start()
    yield server
    server.stop()


def store(server, key: str, tokens: int) -> bool:
    with grpcclient.InferenceServerClient(server.grpc_url) as triton:
        inputs = [grpcclient.InferInput("KEY", [1], "BYTES"), grpcclient.InferInput("EMBEDS", [tokens, 64], "FP32"),
                  grpcclient.InferInput("GRID_THW", [3], "INT64")]
        inputs[0].set_data_from_numpy(np.array([key.encode()], dtype=np.object_))
        inputs[1].set_data_from_numpy(np.full((tokens, 64), len(key), np.float32))
        inputs[2].set_data_from_numpy(np.array([1, 2, tokens * 2], np.int64))
        return bool(triton.infer("vit_cache", inputs).as_numpy("FOUND")[0])


def test_eviction_under_a_small_budget(small_cache_server):
    server = small_cache_server
    assert store(server, "a", 16) and store(server, "bb", 16)  # 4120 bytes each: "bb" evicts "a"
    assert cached_embeddings(server, "a") is None
    assert (cached_embeddings(server, "bb") == 2).all()
    assert store(server, "a", 16)  # evicts "bb"
    assert cached_embeddings(server, "bb") is None and cached_embeddings(server, "a").shape == (16, 64)
    assert not store(server, "huge", 64)  # 16408 bytes never fit: refused, nothing evicted
    assert cached_embeddings(server, "a") is not None
    assert metric(server, "vlm_vit_cache_evictions_total") == 2
    assert metric(server, "vlm_vit_cache_hits_total") == 3 and metric(server, "vlm_vit_cache_misses_total") == 2
    assert metric(server, "vlm_vit_cache_bytes") == 16 * 64 * 4 + 3 * 8
    assert metric(server, "vlm_vit_cache_entries") == 1
