"""The benchmark clients against our running stack (the shared fixture), a few requests each."""

from __future__ import annotations

import pytest

from perf import openai_bench
from perf.dataset_bench import WORKLOADS, assign, to_session
from perf.internvl_data import load_jsonl
from perf.media_server import MediaServer
from perf.sessions import run_sessions
from perf.stats import summarize
from perf.stream_client import Target
from perf.synthetic_data import synthesize

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("perf-data")
    conversations = list(load_jsonl(synthesize(root, per_shape=1, seed=5, max_side=320)))
    with MediaServer(root) as media:
        yield conversations, media


def test_reference_benchmark_on_our_stack(stack, data):
    conversations, media = data
    target = Target("ours", stack.proxy.base_url, "tiny-qwen2-vl")
    images = [media.url(path) for c in conversations for path in c.images][:2]
    records, wall_s = openai_bench.run(target, images, requests=3, workers=2, max_tokens=MAX_TOKENS)
    assert all(r.ok for r in records), [r.error for r in records]
    summary = summarize(records, wall_s)
    assert summary["output_tokens"] == sum(r.completion_tokens for r in records) > 0
    assert all(0 < r.ttft_s <= r.latency_s and 0 < r.completion_tokens <= MAX_TOKENS for r in records)


def test_dataset_workloads_on_our_stack(stack, data):
    conversations, media = data
    target = Target("ours", stack.proxy.base_url, "tiny-qwen2-vl")
    plan = assign(conversations, [WORKLOADS[w] for w in ("multi-round", "multi-image", "single-image")], 1)
    for name, (conversation,) in plan.items():
        session = to_session(conversation, WORKLOADS[name], media.url)
        turns, _ = run_sessions(target, [session], workers=1, max_tokens=MAX_TOKENS)
        assert all(t.record.ok for t in turns), [t.record.error for t in turns]
        assert len(turns) == (len(conversation.rounds) if name == "multi-round" else 1)
        assert all(t.record.prompt_tokens > 0 and t.text for t in turns)
