"""The paged K/V pool: one preallocated tensor per layer, cut into fixed-size blocks.

Block b of layer l holds K and V of block_size tokens at `pools[l][:, b]`; which tokens is the
block manager's business. Token slots are addressed flat, slot = block * block_size + offset.
"""

from __future__ import annotations

import torch

DEFAULT_CPU_KV_CACHE_BYTES = 256 * 2**20
DEFAULT_GPU_MEMORY_FRACTION = 0.5  # of the free memory after loading: the ViT may share the GPU


def kv_cache_budget(device: torch.device, kv_cache_bytes: int | None, memory_fraction: float | None) -> int:
    """Bytes for the pool: kv_cache_bytes if given, else memory_fraction of the GPU's free memory,
    else on CPU (where "free memory" is shared with everything else) a fixed default."""
    if kv_cache_bytes is not None:
        return kv_cache_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fraction = DEFAULT_GPU_MEMORY_FRACTION if memory_fraction is None else memory_fraction
        if not 0 < fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {fraction}")
        return int(free * fraction)
    return DEFAULT_CPU_KV_CACHE_BYTES


class KVCachePool:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Zeroed, not empty: attention reads whole blocks and masks the unused slots, and a
        # masked NaN would still poison the weighted sum (0 * NaN).
        self.pools = [
            torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values [n, kv_heads, head_dim] of n tokens at the given flat slots."""
        pool = self.pools[layer]
        flat = pool.view(2, -1, *pool.shape[3:])
        flat[0].index_copy_(0, slots, keys)
        flat[1].index_copy_(0, slots, values)

    def gather(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [B, kv_heads, num_blocks * block_size, head_dim] of the blocks in each row of
        block_tables [B, num_blocks], in order."""
        pool = self.pools[layer]
        batch, blocks = block_tables.shape
        # index_select on flattened blocks: several times faster than advanced indexing on CPU.
        kv = pool.view(2, self.num_blocks, -1).index_select(1, block_tables.flatten())
        kv = kv.view(2, batch, blocks * self.block_size, *pool.shape[3:])
        return kv[0].transpose(1, 2), kv[1].transpose(1, 2)
