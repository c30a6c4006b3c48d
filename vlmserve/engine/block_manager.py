"""Which KV block holds what: allocation, reference counts and the prefix cache.

Blocks are ids into the preallocated pool (`kv_cache.KVCachePool`). A full block whose KV is
computed is published under its content key (`block_hash`); a later sequence whose prompt starts
with the same blocks takes them by reference instead of recomputing them. A block nobody
references stays in the cache until its id is needed again, evicted least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from vlmserve.engine.block_hash import extend_block_hashes
from vlmserve.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # content key -> block holding that KV
        self._free: deque[int] = deque(range(num_blocks))  # unreferenced, holding nothing reusable
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, LRU first
        self.hit_tokens = 0  # prompt tokens whose KV came from the cache
        self.query_tokens = 0  # prompt tokens looked up in the cache

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's leading full blocks, at most all but its last token (that
        one must run to give logits). Takes no references."""
        if not self.enable_prefix_caching:
            return []
        num_full = (seq.num_tokens - 1) // self.block_size
        extend_block_hashes(seq, num_full, self.block_size)
        blocks = []
        for key in seq.block_hashes[:num_full]:
            block = self._cached.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def can_admit(self, cached_blocks: list[int], num_new_blocks: int) -> bool:
        """Whether taking cached_blocks and num_new_blocks fresh ones fits: reviving an evictable
        cached block uses up a free block just as a fresh one does."""
        revived = sum(1 for block in cached_blocks if self._ref_counts[block] == 0)
        return revived + num_new_blocks <= self.num_free_blocks

    def admit(self, seq: Sequence, cached_blocks: list[int]) -> None:
        """Give a waiting seq the cached blocks of its prefix; their tokens count as computed.
        Counts the lookup here, once per admission, not per attempt."""
        for block in cached_blocks:
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
        seq.block_table = list(cached_blocks)
        seq.num_published_blocks = len(cached_blocks)
        seq.num_cached_tokens = len(cached_blocks) * self.block_size
        if not seq.num_output_tokens:  # a preempted sequence admitted again reports its first admission
            seq.num_prefix_hit_tokens = seq.num_cached_tokens
        if self.enable_prefix_caching:
            self.query_tokens += seq.num_tokens
            self.hit_tokens += seq.num_cached_tokens

    def free_capacity(self, seq: Sequence) -> int:
        """How many more tokens seq can hold: its unused slots plus every free block."""
        return (len(seq.block_table) + self.num_free_blocks) * self.block_size - seq.num_cached_tokens

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Add blocks so seq's table covers num_tokens tokens (callers check the capacity)."""
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            block = self._take_free_block()
            self._ref_counts[block] = 1
            seq.block_table.append(block)

    def publish(self, seq: Sequence) -> None:
        """Enter seq's newly computed full blocks into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_cached_tokens // self.block_size
        extend_block_hashes(seq, num_full, self.block_size)
        for index in range(seq.num_published_blocks, num_full):
            key, block = seq.block_hashes[index], seq.block_table[index]
            # Another sequence may have computed the same content at the same time; the first
            # copy stays the cached one and this block is freed as plain memory.
            if key not in self._cached:
                self._cached[key] = block
                self._hash_of[block] = key
        seq.num_published_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Drop seq's references. The tail goes to the eviction order first: a prefix is more
        likely to be shared than what follows it."""
        for block in reversed(seq.block_table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if self._hash_of[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None
        seq.block_table = []

    def _take_free_block(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._evictable.popitem(last=False)
        del self._cached[self._hash_of[block]]
        self._hash_of[block] = None
        return block
