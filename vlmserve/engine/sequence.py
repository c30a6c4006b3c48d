"""State of one request inside the engine."""

from __future__ import annotations

import enum
import itertools

import numpy as np
import torch

from vlmserve.engine.sampling import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # nothing in the KV cache yet
    RUNNING = "running"  # holds a batch slot (prefilling in chunks or decoding)
    FINISHED = "finished"


class Sequence:
    """Prompt + generated tokens of one request and how far the KV cache has got.

    `token_ids[:num_cached_tokens]` are in the KV cache; the rest (the uncached prompt tail, or
    the last sampled token) still have to run through the model.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: np.ndarray,
        position_ids: np.ndarray,
        rope_delta: int,
        media_embeds: torch.Tensor | None,
        media_positions: np.ndarray,
        sampling: SamplingParams,
    ) -> None:
        self.seq_id = next(_seq_ids)  # engine-internal key (KV cache); request ids may be reused
        self.request_id = request_id
        self.token_ids: list[int] = prompt_ids.tolist()
        self.num_prompt_tokens = len(self.token_ids)
        self.position_ids = position_ids  # int64 [3, num_prompt_tokens] M-RoPE ids of the prompt
        self.rope_delta = rope_delta  # token i >= num_prompt_tokens sits at position i + rope_delta
        # Row r of media_embeds replaces the embedding of prompt token media_positions[r].
        self.media_embeds = media_embeds
        self.media_positions = media_positions
        self.sampling = sampling
        self.generator = torch.Generator()
        if sampling.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(sampling.seed)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.num_cached_tokens = 0

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
        prompt = self.position_ids[:, start : min(end, self.num_prompt_tokens)]
        generated = np.arange(max(start, self.num_prompt_tokens), end, dtype=np.int64) + self.rope_delta
        return np.concatenate([prompt, np.broadcast_to(generated, (3, generated.size))], axis=1)

    def media_in(self, start: int, end: int) -> tuple[np.ndarray, torch.Tensor | None]:
        """(offsets from start, embedding rows) of the media tokens among tokens start..end-1."""
        lo, hi = np.searchsorted(self.media_positions, (start, end))
        if lo == hi:
            return self.media_positions[:0], None
        return self.media_positions[lo:hi] - start, self.media_embeds[lo:hi]

    def mark_cached(self, num_tokens: int) -> None:
        self.num_cached_tokens += num_tokens
        if self.num_cached_tokens >= self.num_prompt_tokens:
            self.media_embeds = None  # the prompt is in the KV cache: free the embeddings

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
