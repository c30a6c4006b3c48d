"""One batched forward of the Qwen2-VL language model over the chunks of a step.

All new tokens of all sequences are flattened into one [T, hidden] batch (varlen, as in
nano-vllm): embeddings, norms, projections, MLP and rotary run once over the batch; attention
reads each sequence's K/V from the paged pool (`attention.py`). The math is HF's own modules
(`Qwen2VLDecoderLayer` parts, `Qwen2VLRotaryEmbedding`, `apply_rotary_pos_emb`) so the numerics
follow `Qwen2VLForConditionalGeneration`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLAttention, apply_rotary_pos_emb

from vlmserve.engine.attention import AttentionMetadata, paged_attention
from vlmserve.engine.kv_cache import KVCachePool
from vlmserve.engine.scheduler import Chunk


class ModelRunner:
    def __init__(self, checkpoint_dir: str | Path, device: torch.device, dtype: torch.dtype) -> None:
        model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint_dir, dtype=dtype)
        # The `vit` model serves the vision tower; here only its embeddings come in.
        del model.model.visual
        model.to(device).eval()
        self.config = model.config
        self.device = device
        self.dtype = dtype
        language_model = model.model.language_model
        self.embed_tokens = language_model.embed_tokens
        self.layers = language_model.layers
        self.norm = language_model.norm
        self.rotary_emb = language_model.rotary_emb
        self.lm_head = model.lm_head
        self.kv_cache: KVCachePool | None = None  # allocate_kv_cache, once the budget is known

    def kv_bytes_per_block(self, block_size: int) -> int:
        attn = self.layers[0].self_attn
        return KVCachePool.bytes_per_block(
            len(self.layers), block_size, attn.num_key_value_heads, attn.head_dim, self.dtype
        )

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        attn = self.layers[0].self_attn
        self.kv_cache = KVCachePool(
            len(self.layers), num_blocks, block_size, attn.num_key_value_heads, attn.head_dim,
            self.dtype, self.device,
        )

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Logits [num sampling chunks, vocab] of the last token of each chunk with `samples`.
        The blocks of every chunk's tokens must already be in its sequence's block table."""
        bounds = np.cumsum([0] + [chunk.num_tokens for chunk in chunks]).tolist()
        meta = AttentionMetadata.build(chunks, bounds, self.kv_cache.block_size, self.device)
        hidden = self._embed(chunks, bounds)
        positions = np.concatenate([chunk.seq.positions(chunk.start, chunk.end) for chunk in chunks], axis=1)
        # HF's M-RoPE: per-axis angles recomposed along mrope_section -> cos/sin [1, T, head_dim].
        cos, sin = self.rotary_emb(hidden, torch.from_numpy(positions).to(self.device)[:, None, :])
        cos, sin = cos[0], sin[0]
        for index, layer in enumerate(self.layers):
            attn_in = layer.input_layernorm(hidden)
            hidden = hidden + self._attention(layer.self_attn, index, attn_in, cos, sin, meta)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        last = [bounds[i + 1] - 1 for i, chunk in enumerate(chunks) if chunk.samples]
        return self.lm_head(self.norm(hidden[last]))

    def _embed(self, chunks: list[Chunk], bounds: list[int]) -> torch.Tensor:
        """Token embeddings [T, hidden] with image/video pad rows replaced by the media embeddings."""
        ids = [token for chunk in chunks for token in chunk.seq.token_ids[chunk.start : chunk.end]]
        hidden = self.embed_tokens(torch.tensor(ids, device=self.device))
        rows, embeds = [], []
        for chunk, offset in zip(chunks, bounds):
            positions, media = chunk.seq.media_in(chunk.start, chunk.end)
            if media is not None:
                rows.append(positions + offset)
                embeds.append(media)
        if rows:
            index = torch.from_numpy(np.concatenate(rows)).to(self.device)
            hidden[index] = torch.cat(embeds).to(hidden.dtype)
        return hidden

    def _attention(
        self,
        attn: Qwen2VLAttention,
        layer: int,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens, head_dim = x.shape[0], attn.head_dim
        q = attn.q_proj(x).view(num_tokens, -1, head_dim)
        k = attn.k_proj(x).view(num_tokens, -1, head_dim)
        v = attn.v_proj(x).view(num_tokens, -1, head_dim)
        # [T, heads, head_dim] with cos/sin [T, head_dim]: broadcast over heads at dim 1.
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        self.kv_cache.write(layer, meta.slots, k, v)
        out = paged_attention(q, self.kv_cache, layer, meta, attn.scaling)
        return attn.o_proj(out.reshape(num_tokens, -1))
