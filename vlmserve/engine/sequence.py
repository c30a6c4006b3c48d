"""State of one request inside the engine."""

from __future__ import annotations

import enum
import itertools

import numpy as np
import torch

from vlmserve.engine.sampling import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # nothing in the KV cache yet (new, or preempted)
    RUNNING = "running"  # holds a batch slot and KV blocks (prefilling in chunks or decoding)
    FINISHED = "finished"


class MediaSpan:
    """Media embedding rows row_start..row_start+num_rows-1 come from one medium whose content
    hashes to `key`: what the prefix cache keys the KV of those pad tokens by."""

    __slots__ = ("key", "num_rows", "row_start")

    def __init__(self, key: str, row_start: int, num_rows: int) -> None:
        self.key = key
        self.row_start = row_start
        self.num_rows = num_rows


class Sequence:
    """Prompt + generated tokens of one request, its KV blocks and how far the KV cache has got.

    `token_ids[:num_cached_tokens]` are in the KV cache, in the blocks of `block_table` (block i
    holds tokens i*block_size..); the rest (the uncached prompt tail, the last sampled token, or
    everything after a preemption) still have to run through the model.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: np.ndarray,
        position_ids: np.ndarray,
        rope_delta: int,
        media_embeds: torch.Tensor | None,
        media_positions: np.ndarray,
        media_spans: list[MediaSpan],
        sampling: SamplingParams,
    ) -> None:
        self.seq_id = next(_seq_ids)  # engine-internal key; request ids may be reused
        self.request_id = request_id
        self.token_ids: list[int] = prompt_ids.tolist()
        self.num_prompt_tokens = len(self.token_ids)
        self.position_ids = position_ids  # int64 [3, num_prompt_tokens] M-RoPE ids of the prompt
        self.rope_delta = rope_delta  # token i >= num_prompt_tokens sits at position i + rope_delta
        # Row r of media_embeds replaces the embedding of prompt token media_positions[r]. Kept
        # until the request ends: a preempted sequence recomputes its prompt from them.
        self.media_embeds = media_embeds
        self.media_positions = media_positions
        self.media_spans = media_spans
        self.sampling = sampling
        self.generator = torch.Generator()
        if sampling.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(sampling.seed)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.num_cached_tokens = 0
        self.num_prefix_hit_tokens = 0  # prompt tokens the prefix cache served when first admitted
        self.block_table: list[int] = []
        # Prefix-cache hashes of full blocks 0..len-1 (content-defined, so they survive preemption)
        # and how many of the blocks in block_table are already published to the prefix cache.
        self.block_hashes: list[bytes] = []
        self.num_published_blocks = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncached_tokens(self) -> int:
        return self.num_tokens - self.num_cached_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def positions(self, start: int, end: int) -> np.ndarray:
        """M-RoPE ids int64 [3, end - start] of tokens start..end-1."""
        if end <= self.num_prompt_tokens:
            return self.position_ids[:, start:end]
        generated = np.arange(max(start, self.num_prompt_tokens), end, dtype=np.int64) + self.rope_delta
        generated = generated[None].repeat(3, axis=0)  # text positions: the same on all three axes
        if start >= self.num_prompt_tokens:  # every decode step: skip the concatenate
            return generated
        return np.concatenate([self.position_ids[:, start:], generated], axis=1)

    def media_in(self, start: int, end: int) -> tuple[np.ndarray, torch.Tensor | None]:
        """(offsets from start, embedding rows) of the media tokens among tokens start..end-1."""
        if start >= self.num_prompt_tokens or not self.media_positions.size:
            return self.media_positions[:0], None
        lo, hi = np.searchsorted(self.media_positions, (start, end))
        if lo == hi:
            return self.media_positions[:0], None
        return self.media_positions[lo:hi] - start, self.media_embeds[lo:hi]

    def media_keys(self, start: int, end: int) -> list[str]:
        """What identifies the media embedding rows of tokens start..end-1: for each medium they
        touch, its content hash and which of its rows."""
        lo, hi = (int(i) for i in np.searchsorted(self.media_positions, (start, end)))
        keys = []
        for span in self.media_spans:
            first, last = max(lo, span.row_start), min(hi, span.row_start + span.num_rows)
            if first < last:
                keys.append(f"{span.key}:{first - span.row_start}:{last - first}")
        return keys

    def mark_cached(self, num_tokens: int) -> None:
        self.num_cached_tokens += num_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """After preemption freed the KV blocks: prompt + output so far run again as a prefill."""
        self.status = SequenceStatus.WAITING
        self.num_cached_tokens = 0
        self.block_table = []
        self.num_published_blocks = 0

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.media_embeds = None
