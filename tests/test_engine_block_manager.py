"""Block allocation, sharing and LRU eviction of the prefix cache, without a model."""

from __future__ import annotations

import numpy as np

from vlmserve.engine import SamplingParams
from vlmserve.engine.block_manager import BlockManager
from vlmserve.engine.sequence import Sequence


def text_seq(ids: list[int]) -> Sequence:
    positions = np.broadcast_to(np.arange(len(ids)), (3, len(ids)))
    return Sequence("r", np.array(ids), positions, 0, None, np.zeros(0, np.int64), [], SamplingParams())


def run_prompt(blocks: BlockManager, ids: list[int]) -> Sequence:
    """Admit with whatever the cache has, compute the rest, publish."""
    seq = text_seq(ids)
    cached = blocks.match_prefix(seq)
    assert blocks.can_admit(cached, blocks.blocks_for(len(ids)) - len(cached))
    blocks.admit(seq, cached)
    blocks.grow(seq, len(ids))
    seq.mark_cached(len(ids) - seq.num_cached_tokens)
    blocks.publish(seq)
    return seq


def test_shared_prefix_blocks_are_referenced_not_copied():
    blocks = BlockManager(num_blocks=8, block_size=2)
    a = run_prompt(blocks, [1, 2, 3, 4, 5])
    b = run_prompt(blocks, [1, 2, 3, 4, 9, 9])
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert (blocks.hit_tokens, blocks.query_tokens) == (4, 11)
    assert blocks.num_used_blocks == 4
    blocks.free(a)
    assert blocks.num_used_blocks == 3  # the shared blocks stay with b
    blocks.free(b)
    assert blocks.num_used_blocks == 0 and blocks.num_free_blocks == 8


def test_the_last_token_always_runs():
    blocks = BlockManager(num_blocks=8, block_size=2)
    blocks.free(run_prompt(blocks, [1, 2, 3, 4]))
    again = text_seq([1, 2, 3, 4])
    assert len(blocks.match_prefix(again)) == 1  # block [3, 4] is cached, but token 4 must give logits


def test_unreferenced_cached_blocks_are_evicted_least_recently_freed_first():
    blocks = BlockManager(num_blocks=4, block_size=2)
    blocks.free(run_prompt(blocks, [1, 2, 3, 4, 5]))  # caches [1, 2], [3, 4]; frees the tail first
    assert blocks.num_free_blocks == 4
    # Needs three blocks: the two never-cached ones, then the oldest in eviction order, [3, 4].
    other = run_prompt(blocks, [7, 7, 7, 7, 7, 7])
    cached = blocks.match_prefix(text_seq([1, 2, 3]))
    assert len(cached) == 1 and blocks.num_free_blocks == 1
    # Reviving a cached block takes a free block just as a fresh one does.
    assert blocks.can_admit(cached, 0) and not blocks.can_admit(cached, 1)
    blocks.free(other)


def test_disabled_prefix_cache_neither_matches_nor_counts():
    blocks = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    blocks.free(run_prompt(blocks, [1, 2, 3, 4, 5]))
    seq = run_prompt(blocks, [1, 2, 3, 4, 5])
    assert seq.num_cached_tokens == 5 and (blocks.hit_tokens, blocks.query_tokens) == (0, 0)
