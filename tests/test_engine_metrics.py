"""The llm model's KV-cache and prefix-cache metrics on Triton's /metrics, through the running stack."""

from __future__ import annotations

import json
import queue
import re
import time
import uuid

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
from transformers import AutoConfig
from tritonclient.utils import np_to_triton_dtype

PREFIX = "vlm_llm_"


def metrics(stack) -> dict[str, float]:
    body = httpx.get(stack.triton.metrics_url, timeout=10).text
    return {name: float(value) for name, value in
            re.findall(rf"^({PREFIX}\w+)(?:{{[^}}]*}})? ([0-9.e+-]+)$", body, re.MULTILINE)}


def settled_metrics(stack, steps_before: float = -1, timeout_s: float = 10) -> dict[str, float]:
    """The llm's metrics once it has stepped past `steps_before` and published its idle state.

    While busy the model publishes at most every 0.1 s, so figures read the moment a response
    arrives can be a step behind. After `timeout_s` the last figures are returned as they are.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        values = metrics(stack)
        settled = (values.get(PREFIX + "steps_total", 0) > steps_before and values[PREFIX + "active_requests"] == 0
                   and values[PREFIX + "running_requests"] == 0 and values[PREFIX + "waiting_requests"] == 0
                   and values[PREFIX + "kv_blocks_used"] == 0)
        if settled or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


def chat(client: openai.OpenAI, text: str) -> None:
    stream = client.chat.completions.create(
        model="tiny-qwen2-vl", messages=[{"role": "user", "content": text}], stream=True, temperature=0, max_tokens=4)
    for _ in stream:
        pass


@pytest.mark.parametrize("engine", ["vllm", "native"])
def test_kv_and_prefix_cache_metrics(engine, request):
    stack = request.getfixturevalue(f"{engine}_stack")
    client = openai.OpenAI(base_url=stack.proxy.base_url, api_key="unused", max_retries=0, timeout=120)
    before = metrics(stack)
    # Longer than one of vLLM's 128-token CPU KV blocks.
    question = "Tell me about the weather in a city with many bridges and rivers. " * 12
    chat(client, question)
    chat(client, question)  # same prompt: its full blocks come from the prefix cache

    after = settled_metrics(stack, before.get(PREFIX + "steps_total", 0))
    assert after[PREFIX + "kv_blocks_total"] > 0
    assert after[PREFIX + "kv_blocks_used"] == 0 and after[PREFIX + "waiting_requests"] == 0
    assert after[PREFIX + "running_requests"] == 0
    hits = after[PREFIX + "prefix_cache_hit_tokens_total"] - before.get(PREFIX + "prefix_cache_hit_tokens_total", 0)
    queries = (after[PREFIX + "prefix_cache_query_tokens_total"]
               - before.get(PREFIX + "prefix_cache_query_tokens_total", 0))
    assert hits >= 16 and queries > hits  # the first turn looked up its whole prompt and hit (nearly) nothing
    assert after[PREFIX + "tokens_per_step"] >= 1 and PREFIX + "preemptions_total" in after


def llm_first_token(stack, input_ids: np.ndarray, embeds: np.ndarray, media_keys: list[str],
                    grids: np.ndarray) -> None:
    """One greedy token straight from the `llm` model, with given media embeddings and content keys."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(stack.triton.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put(error or result))
    tensors = {
        "REQUEST_ID": np.asarray([uuid.uuid4().hex.encode()], dtype=np.object_),
        "INPUT_IDS": input_ids,
        "MEDIA_EMBEDS": embeds,
        "MEDIA_KEYS": np.asarray([key.encode() for key in media_keys], dtype=np.object_),
        "MEDIA_GRID_THW": grids,
        "SAMPLING": np.asarray([json.dumps({"max_tokens": 1}).encode()], dtype=np.object_),
    }
    inputs = []
    for name, value in tensors.items():
        inputs.append(grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype)))
        inputs[-1].set_data_from_numpy(value)
    try:
        client.async_stream_infer("llm", inputs, enable_empty_final_response=True)
        while True:
            response = responses.get(timeout=60)
            if isinstance(response, Exception):
                raise response
            if response.get_response().parameters["triton_final_response"].bool_param:
                return
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.parametrize("engine", ["vllm", "native"])
def test_prefix_cache_matches_media_by_their_content_keys(engine, request, tiny_checkpoint):
    """The vlm model sends each medium's content key (MEDIA_KEYS); the llm's prefix cache matches media
    by it rather than by their embedding rows, which a GPU ViT need not reproduce bit for bit."""
    stack = request.getfixturevalue(f"{engine}_stack")
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    grid = np.asarray([[1, 32, 32]], dtype=np.int64)  # 256 image tokens: full KV blocks of 16 (native), 128 (vLLM)
    pads = int(grid.prod()) // config.vision_config.spatial_merge_size**2
    input_ids = np.asarray([11, 12, 13] + [config.image_token_id] * pads + [14, 15], dtype=np.int64)
    rows = np.random.default_rng(0).standard_normal((2, pads, config.text_config.hidden_size)).astype(np.float32)

    def hit_tokens_of(embeds: np.ndarray, key: str) -> float:
        before = metrics(stack)
        llm_first_token(stack, input_ids, embeds, [key], grid)
        after = settled_metrics(stack, before.get(PREFIX + "steps_total", 0))
        return after[PREFIX + "prefix_cache_hit_tokens_total"] - before.get(PREFIX + "prefix_cache_hit_tokens_total", 0)

    key = uuid.uuid4().hex
    assert hit_tokens_of(rows[0], key) == 0
    assert hit_tokens_of(rows[1], key) == 256  # other rows, same key: every full block is reused
    assert hit_tokens_of(rows[0], uuid.uuid4().hex) == 0  # the first rows under a new key: nothing
