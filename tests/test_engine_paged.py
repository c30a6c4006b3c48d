"""The engine's paged KV cache: many concurrent requests, prefix cache, preemption, cancellation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_llm_engine import (  # noqa: F401 (hf_model, one_torch_thread: fixtures)
    TEXT_VOCAB,
    Prompt,
    RecordingSampler,
    drain,
    hf_model,
    one_torch_thread,
    tokens,
)
from vlmserve.engine import LLMEngine, SamplingParams
from vlmserve.engine.kv_cache import KVCachePool
from vlmserve.errors import InvalidRequest
from vlmserve.mrope import mrope_positions

BLOCK = 16


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def reference(checkpoint) -> LLMEngine:
    """Runs one request at a time with a cold cache: what 'running alone' means below."""
    return LLMEngine(checkpoint, enable_prefix_caching=False, kv_cache_bytes=16 * 2**20)


def run_alone(engine: LLMEngine, prompt, sampling: SamplingParams) -> list[int]:
    prompt.add_to(engine, "alone", sampling)
    return tokens(drain(engine)["alone"])


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0)


class ChatPrompt:
    """A prompt of text pieces and images, as `vlm` builds it: ids, M-RoPE positions, embeddings."""

    def __init__(self, hf_model, parts: list, media_hashes: list | None = None) -> None:
        config = hf_model.config
        pieces, grids, media = [], [], []
        for part in parts:
            if isinstance(part, Image):
                pieces += [[config.vision_start_token_id], [config.image_token_id] * part.num_pads(config),
                           [config.vision_end_token_id]]
                grids.append(part.grid)
                media.append(part.embeds(hf_model))
            else:
                pieces.append(part)
        self.ids = np.concatenate(pieces).astype(np.int64)
        self.positions, self.rope_delta = mrope_positions(self.ids, np.array(grids) if grids else None, None, config)
        self.media = np.concatenate(media) if media else None
        self.media_hashes = media_hashes

    def add_to(self, engine: LLMEngine, request_id: str, sampling: SamplingParams) -> None:
        engine.add_request(request_id, self.ids, self.positions, self.rope_delta, self.media, sampling,
                           media_hashes=self.media_hashes)


class Image:
    def __init__(self, grid: tuple[int, int, int], seed: int) -> None:
        self.grid = grid
        self.seed = seed

    def num_pads(self, config) -> int:
        return int(np.prod(self.grid)) // config.vision_config.spatial_merge_size**2

    def embeds(self, hf_model) -> np.ndarray:
        generator = torch.Generator().manual_seed(self.seed)
        pixels = torch.randn(int(np.prod(self.grid)), 3 * 2 * 14 * 14, generator=generator)
        with torch.no_grad():
            return hf_model.model.visual(pixels, grid_thw=torch.tensor([self.grid])).pooler_output.numpy()


def text(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TEXT_VOCAB, n)


def full_blocks(num_tokens: int) -> int:
    return num_tokens // BLOCK * BLOCK


def test_concurrent_requests_match_running_alone_and_give_blocks_back(checkpoint, hf_model, reference):
    rng = np.random.default_rng(0)
    specs = []
    for i in range(32):
        if i % 8 == 3:
            prompt = Prompt(hf_model, (int(rng.integers(2, 20)), 5), grid=(1, 4, 6), seed=100 + i)
        elif i % 8 == 6:
            prompt = Prompt(hf_model, (4, int(rng.integers(2, 30))), grid=(2, 4, 4), kind="video", seed=100 + i)
        else:
            prompt = Prompt(hf_model, (int(rng.integers(1, 90)),), seed=100 + i)
        specs.append((prompt, greedy(int(rng.integers(3, 24)))))
    engine = LLMEngine(checkpoint, max_num_seqs=16, max_num_batched_tokens=256)
    arrivals = {step: [lambda i=i, p=p, s=s: p.add_to(engine, f"r{i}", s)
                       for i, (p, s) in enumerate(specs) if i % 4 == step] for step in range(4)}
    outputs = drain(engine, arrivals)

    for i, (prompt, sampling) in enumerate(specs):
        assert tokens(outputs[f"r{i}"]) == run_alone(reference, prompt, sampling), f"r{i}"
    assert engine.stats.max_batch_size == 16 and engine.kv_blocks_used() == 0

    for i in range(20):
        Prompt(hf_model, (20 + i,), seed=200 + i).add_to(engine, f"c{i}", greedy(30))
    while len(engine.scheduler.running) < 16:
        engine.step()
    assert len(engine.scheduler.waiting) == 4
    cancelled = [f"c{i}" for i in range(10, 20)]  # six running, the four waiting
    for request_id in cancelled:
        engine.abort(request_id)
    held = engine.step()
    assert not {out.request_id for out in held} & set(cancelled)
    assert engine.kv_blocks_used() == sum(len(seq.block_table) for seq in engine.scheduler.running)
    assert {seq.request_id for seq in engine.scheduler.running} == {f"c{i}" for i in range(10)}
    drain(engine)
    assert engine.kv_blocks_used() == 0 and engine.stats.num_running == engine.stats.num_waiting == 0


def test_second_turn_reuses_the_first_turns_kv(checkpoint, hf_model):
    images = [Image((1, 4, 6), seed=1), Image((1, 6, 4), seed=2)]  # 6 pad tokens each
    turn1 = ChatPrompt(hf_model, [text(9, 1), images[0], text(3, 2), images[1], text(25, 3)])
    engine = LLMEngine(checkpoint)
    engine.sampler = RecordingSampler()
    turn1.add_to(engine, "turn1", greedy(12))
    answer = tokens(drain(engine)["turn1"])
    assert engine.stats.prefix_cache_hit_tokens == 0

    turn2 = ChatPrompt(hf_model, [text(9, 1), images[0], text(3, 2), images[1], text(25, 3), np.array(answer),
                                  text(30, 4)])
    assert (turn2.positions[:, : len(turn1.ids)] == turn1.positions).all()
    tokens_before, queries_before = engine.stats.scheduled_tokens, engine.stats.prefix_cache_query_tokens
    turn2.add_to(engine, "turn2", greedy(10))
    got = tokens(drain(engine)["turn2"])

    # Turn 1 computed its prompt and all but its last answer token; turn 2 reuses the full blocks.
    shared = full_blocks(len(turn1.ids) + len(answer) - 1)
    assert shared >= 3 * BLOCK
    assert engine.stats.prefix_cache_hit_tokens == shared
    assert engine.stats.prefix_cache_query_tokens - queries_before == len(turn2.ids)
    assert engine.stats.prefix_cache_hit_rate == shared / (len(turn1.ids) + len(turn2.ids))
    assert engine.stats.scheduled_tokens - tokens_before == len(turn2.ids) - shared + 10 - 1

    cold = LLMEngine(checkpoint, enable_prefix_caching=False)
    cold.sampler = RecordingSampler()
    turn2.add_to(cold, "turn2", greedy(10))
    assert got == tokens(drain(cold)["turn2"])
    for warm_row, cold_row in zip(engine.sampler.logits["turn2"], cold.sampler.logits["turn2"], strict=True):
        torch.testing.assert_close(warm_row, cold_row, atol=1e-4, rtol=1e-4)


def test_prefix_hit_ending_inside_an_image_uses_its_remaining_rows(checkpoint, hf_model, reference):
    image = Image((1, 8, 8), seed=3)  # 16 pad tokens: tokens 11..26, so block 0 ends inside the image
    first = ChatPrompt(hf_model, [text(10, 5), image, text(8, 6)])
    second = ChatPrompt(hf_model, [text(10, 5), image, text(20, 7)])
    engine = LLMEngine(checkpoint)
    first.add_to(engine, "first", greedy(4))
    drain(engine)
    second.add_to(engine, "second", greedy(8))
    got = tokens(drain(engine)["second"])
    assert engine.stats.prefix_cache_hit_tokens == BLOCK
    assert got == run_alone(reference, second, greedy(8))


def test_same_tokens_at_other_positions_or_with_other_media_do_not_share(checkpoint, hf_model):
    engine = LLMEngine(checkpoint)
    ids = text(40, 8)
    positions = np.broadcast_to(np.arange(40), (3, 40))
    engine.add_request("a", ids, positions, 0, None, greedy(2))
    drain(engine)
    engine.add_request("b", ids, positions + 7, 7, None, greedy(2))  # as if after a 7-token-wider image
    drain(engine)
    assert engine.stats.prefix_cache_hit_tokens == 0
    engine.add_request("a-again", ids, positions, 0, None, greedy(2))
    drain(engine)
    assert engine.stats.prefix_cache_hit_tokens == full_blocks(40 - 1)

    # Same ids and positions, another image: only the block before the image is shared.
    for request_id, seed in (("c", 11), ("d", 12)):
        ChatPrompt(hf_model, [text(20, 9), Image((1, 4, 6), seed=seed), text(30, 10)]).add_to(
            engine, request_id, greedy(2))
        drain(engine)
    assert engine.stats.prefix_cache_hit_tokens == full_blocks(40 - 1) + BLOCK


def test_media_hashes_from_the_request_key_the_cache(checkpoint, hf_model):
    engine = LLMEngine(checkpoint)
    parts = [text(20, 9), Image((1, 4, 6), seed=11), text(30, 10)]
    ChatPrompt(hf_model, parts, media_hashes=["sha-a"]).add_to(engine, "a", greedy(2))
    drain(engine)
    ChatPrompt(hf_model, parts, media_hashes=[("sha-b", 6)]).add_to(engine, "b", greedy(2))
    drain(engine)
    assert engine.stats.prefix_cache_hit_tokens == BLOCK  # the request says it is another image
    other_pixels = [text(20, 9), Image((1, 4, 6), seed=12), text(30, 10)]
    ChatPrompt(hf_model, other_pixels, media_hashes=[("sha-a", 6)]).add_to(engine, "c", greedy(2))
    drain(engine)
    assert engine.stats.prefix_cache_hit_tokens == BLOCK + full_blocks(58 - 1)  # the request's hash wins

    prompt = ChatPrompt(hf_model, parts)
    for bad, match in ((["x", "y"], "2 media hashes for 1 runs"), ([("x", 5)], "cover 5 pad tokens"),
                       ([("x", 0)], "media_hashes entries")):
        with pytest.raises(InvalidRequest, match=match):
            engine.add_request("bad", prompt.ids, prompt.positions, prompt.rope_delta, prompt.media, greedy(2),
                               media_hashes=bad)


def test_small_pool_preempts_and_every_request_still_finishes(checkpoint, hf_model, reference):
    text_config = hf_model.config.text_config
    block_bytes = KVCachePool.bytes_per_block(text_config.num_hidden_layers, BLOCK, text_config.num_key_value_heads,
                                              text_config.hidden_size // text_config.num_attention_heads,
                                              torch.float32)
    engine = LLMEngine(checkpoint, kv_cache_bytes=12 * block_bytes)
    assert engine.kv_blocks_total() == 12
    specs = [(Prompt(hf_model, (20 + 3 * i,), seed=300 + i), greedy(30)) for i in range(6)]
    specs += [(Prompt(hf_model, (5, 9), grid=(1, 8, 8), seed=310), greedy(30)),
              (Prompt(hf_model, (4, 3), grid=(2, 4, 4), kind="video", seed=311), greedy(30))]
    for i, (prompt, sampling) in enumerate(specs):
        prompt.add_to(engine, f"r{i}", sampling)
    outputs = drain(engine, check_step=lambda _: engine.kv_blocks_used() <= 12)

    assert engine.stats.preemptions > 0
    for i, (prompt, sampling) in enumerate(specs):
        got = outputs[f"r{i}"]
        assert tokens(got) == run_alone(reference, prompt, sampling), f"r{i}"
        assert got[-1].finish_reason == "length" and got[-1].num_prompt_tokens == len(prompt.ids)
    assert engine.kv_blocks_used() == 0

    # 150 prompt tokens + 43 outputs, the last of which never runs: 192 tokens = 12 blocks of KV.
    prompt = Prompt(hf_model, (150,), seed=320)
    with pytest.raises(InvalidRequest, match="needs 13 KV cache blocks, more than the 12"):
        prompt.add_to(engine, "too-long", greedy(44))
    prompt.add_to(engine, "fits", greedy(43))
    assert len(drain(engine)["fits"]) == 43
