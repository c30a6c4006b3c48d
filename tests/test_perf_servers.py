"""The benchmarks against real servers: our stack (the shared fixture) and the `transformers serve` peer."""

from __future__ import annotations

import pytest

from perf import openai_bench
from perf.dataset_bench import WORKLOADS, assign, run_workload
from perf.internvl_data import load_jsonl
from perf.media_server import MediaServer
from perf.peer import TransformersServePeer
from perf.stats import summarize
from perf.stream_client import Target, stream_chat
from perf.synthetic_data import synthesize
from vlmserve.processes import free_port

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("perf-data")
    conversations = list(load_jsonl(synthesize(root, per_shape=1, seed=5, max_side=320)))
    with MediaServer(root) as media:
        yield conversations, media


@pytest.fixture(scope="module")
def peer(tiny_checkpoint, tmp_path_factory):
    server = TransformersServePeer(tiny_checkpoint, free_port(), tmp_path_factory.mktemp("peer") / "peer.log",
                                   torch_threads=1)
    server.start()
    yield server
    server.stop()


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
    for name, (sample,) in plan.items():
        turns, _ = run_workload(target, sample, WORKLOADS[name], media.url, workers=1, max_tokens=MAX_TOKENS)
        assert all(t.record.ok for t in turns), [t.record.error for t in turns]
        assert len(turns) == (len(sample[0].rounds) if name == "multi-round" else 1)
        assert all(t.record.prompt_tokens > 0 for t in turns)


def test_peer_answers_like_our_stack(stack, peer, data):
    """Same checkpoint, same pixels, greedy: the peer is a fair baseline only if it computes the same thing."""
    conversations, media = data
    (conversation,) = assign(conversations, [WORKLOADS["multi-image"]], 1)["multi-image"][0]
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": media.url(path)}} for path in conversation.images
    ] + [{"type": "text", "text": "Compare these."}]}]
    ours = Target("ours", stack.proxy.base_url, "tiny-qwen2-vl")
    their_record, their_text = stream_chat(peer.target().client(), peer.target(), messages, MAX_TOKENS)
    our_record, our_text = stream_chat(ours.client(), ours, messages, MAX_TOKENS)
    assert their_record.ok and our_record.ok, (their_record.error, our_record.error)
    assert their_record.prompt_tokens == our_record.prompt_tokens
    assert their_text == our_text and their_record.completion_tokens == our_record.completion_tokens
