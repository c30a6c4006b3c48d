"""The engine's KV-cache and prefix-cache metrics on Triton's /metrics, through the running stack."""

from __future__ import annotations

import re
import time

import httpx
import openai

PREFIX = "vlm_llm_"


def metrics(stack) -> dict[str, float]:
    body = httpx.get(stack.triton.metrics_url, timeout=10).text
    return {name: float(value) for name, value in
            re.findall(rf"^({PREFIX}\w+)(?:{{[^}}]*}})? ([0-9.e+-]+)$", body, re.MULTILINE)}


def settled_metrics(stack, steps_before: float = -1, timeout_s: float = 10) -> dict[str, float]:
    """The engine's metrics once it has stepped past `steps_before` and published its idle state.

    While busy the model publishes at most every 0.5 s, so figures read the moment a response
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


def test_kv_and_prefix_cache_metrics(stack):
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
