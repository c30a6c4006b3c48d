"""Per-sequence K/V storage.

A contiguous buffer per sequence, grown by doubling. The paged block pool (and prefix cache)
replaces this class behind the same three calls: reserve room, write a layer's new K/V and read
back the whole context, free.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        # seq_id -> [num_layers, 2 (K, V), num_kv_heads, capacity, head_dim]
        self._buffers: dict[int, torch.Tensor] = {}

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Make room for the first num_tokens tokens of a sequence (amortized O(1) per token)."""
        old = self._buffers.get(seq_id)
        capacity = 0 if old is None else old.shape[3]
        if num_tokens <= capacity:
            return
        new = torch.empty(
            self.num_layers, 2, self.num_kv_heads, max(num_tokens, 2 * capacity), self.head_dim,
            dtype=self.dtype, device=self.device,
        )
        if old is not None:
            new[:, :, :, :capacity] = old
        self._buffers[seq_id] = new

    def write(
        self, seq_id: int, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values [num_kv_heads, n, head_dim] of tokens start..start+n-1 and return the
        sequence's cached K and V for tokens 0..start+n-1."""
        end = start + keys.shape[1]
        buffer = self._buffers[seq_id][layer]
        buffer[0, :, start:end] = keys
        buffer[1, :, start:end] = values
        return buffer[0, :, :end], buffer[1, :, :end]

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._buffers

    def free(self, seq_id: int) -> None:
        self._buffers.pop(seq_id, None)
