"""LRU cache of ViT outputs, bounded by the bytes of the arrays it holds.

The Triton `vit_cache` model keeps one of these for the whole server (see its model.py for why
there is exactly one); this module is plain Python so the policy is tested without Triton.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CachedEncoding:
    embeds: np.ndarray  # float32 [tokens, hidden]
    grid_thw: np.ndarray  # int64 [3]

    @property
    def nbytes(self) -> int:
        return self.embeds.nbytes + self.grid_thw.nbytes


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


class EmbeddingCache:
    """``get`` / ``put`` by key; least recently used entries go first when ``max_bytes`` is exceeded."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[str, CachedEncoding] = OrderedDict()

    def get(self, key: str) -> CachedEncoding | None:
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry

    def put(self, key: str, embeds: np.ndarray, grid_thw: np.ndarray) -> bool:
        """Store copies of the arrays (the caller's may live in memory Triton reuses); False if too large."""
        entry = CachedEncoding(np.array(embeds, dtype=np.float32), np.array(grid_thw, dtype=np.int64).reshape(3))
        if entry.nbytes > self.max_bytes:
            return False
        self._remove(key)  # a concurrent miss may store the same key twice
        while self.stats.bytes + entry.nbytes > self.max_bytes:
            self._remove(next(iter(self._entries)))
            self.stats.evictions += 1
        self._entries[key] = entry
        self.stats.bytes += entry.nbytes
        self.stats.entries = len(self._entries)
        return True

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.stats.bytes -= entry.nbytes
            self.stats.entries = len(self._entries)
