"""Attention over the paged KV pool for the flattened tokens of a step.

Single-token chunks (decodes) run as one padded batch: gather every sequence's blocks, mask the
slots past its length, one SDPA call per layer. Longer chunks (prefill) run one SDPA call each,
causal and shifted by the tokens already cached. Plain torch, so CPU and CUDA alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmserve.engine.kv_cache import KVCachePool
from vlmserve.engine.scheduler import Chunk


@dataclass
class PrefillChunk:
    lo: int  # rows lo..hi-1 of the step's flattened tokens
    hi: int
    block_table: torch.Tensor  # [1, blocks covering the context]
    context_len: int
    mask: torch.Tensor | None  # None: plain causal (the chunk is the whole context)


@dataclass
class AttentionMetadata:
    slots: torch.Tensor  # [T] flat pool slot of every new token
    decode_rows: torch.Tensor  # [B] rows of the single-token chunks
    decode_tables: torch.Tensor  # [B, max blocks], padded with block 0
    decode_mask: torch.Tensor  # [B, 1, 1, max blocks * block_size]
    prefills: list[PrefillChunk]

    @classmethod
    def build(cls, chunks: list[Chunk], bounds: list[int], block_size: int, device: torch.device) -> AttentionMetadata:
        slots, decode_rows, decode_tables, decode_lens, prefills = [], [], [], [], []
        for chunk, lo, hi in zip(chunks, bounds, bounds[1:]):
            table = chunk.seq.block_table[: -(-chunk.end // block_size)]
            slots.extend(table[i // block_size] * block_size + i % block_size for i in range(chunk.start, chunk.end))
            if chunk.num_tokens == 1:
                decode_rows.append(lo)
                decode_tables.append(table)
                decode_lens.append(chunk.end)
                continue
            mask = None
            if chunk.start:  # query i sits at context position start + i
                mask = torch.arange(chunk.num_tokens, device=device)[:, None] + chunk.start >= torch.arange(
                    chunk.end, device=device
                )
            prefills.append(PrefillChunk(lo, hi, torch.tensor([table], device=device), chunk.end, mask))
        width = max((len(table) for table in decode_tables), default=0)
        padded = [table + [0] * (width - len(table)) for table in decode_tables]
        lens = torch.tensor(decode_lens, device=device)
        return cls(
            slots=torch.tensor(slots, device=device),
            decode_rows=torch.tensor(decode_rows, device=device, dtype=torch.long),
            decode_tables=torch.tensor(padded, device=device, dtype=torch.long).view(len(padded), width),
            decode_mask=(torch.arange(width * block_size, device=device) < lens[:, None])[:, None, None, :],
            prefills=prefills,
        )


def paged_attention(
    q: torch.Tensor, kv: KVCachePool, layer: int, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [T, heads, head_dim] of the step's tokens, whose K/V are already in the pool -> the
    attention output, same shape."""
    out = torch.empty_like(q)
    if len(meta.decode_rows):
        keys, values = kv.gather(layer, meta.decode_tables)
        batch, heads, head_dim = len(meta.decode_rows), q.shape[1], q.shape[2]
        # One query token: the query heads sharing a KV head become rows of one attention
        # ([B, kv_heads, group, head_dim]), cheaper than expanding K/V to every query head.
        queries = q[meta.decode_rows].view(batch, keys.shape[1], -1, head_dim)
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.decode_mask, scale=scale)
        out[meta.decode_rows] = attended.reshape(batch, heads, head_dim)
    for chunk in meta.prefills:
        keys, values = kv.gather(layer, chunk.block_table)
        keys, values = keys[:, :, : chunk.context_len], values[:, :, : chunk.context_len]
        queries = q[chunk.lo : chunk.hi].transpose(0, 1)[None]
        attended = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scale, enable_gqa=True
        )
        out[chunk.lo : chunk.hi] = attended[0].transpose(0, 1)
    return out
