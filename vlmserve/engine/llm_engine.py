"""The engine a serving loop drives: add requests from any thread, call `step()` in one."""

from __future__ import annotations

import collections.abc
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlmserve.engine.block_hash import media_content_hash
from vlmserve.engine.block_manager import BlockManager
from vlmserve.engine.kv_cache import kv_cache_budget
from vlmserve.engine.model_runner import ModelRunner
from vlmserve.engine.sampling import Sampler, SamplingParams
from vlmserve.engine.scheduler import Scheduler
from vlmserve.engine.sequence import MediaSpan, Sequence
from vlmserve.engine.stats import EngineStats
from vlmserve.errors import InvalidRequest
from vlmserve.sampling_options import max_tokens_for


@dataclass(frozen=True)
class StepOutput:
    request_id: str
    token_id: int
    finished: bool
    finish_reason: str | None  # 'stop' | 'length' | None while running
    num_prompt_tokens: int
    num_output_tokens: int  # including token_id
    num_cached_tokens: int  # prompt tokens whose KV the prefix cache served at admission


# One str per run of image/video pad tokens, or (str, number of pad tokens) pairs; in prompt order.
MediaHashes = collections.abc.Sequence[str | tuple[str, int]]


class LLMEngine:
    """Iteration-level batching over a paged KV cache with prefix caching: requests added while
    others decode join at the next step.

    The KV pool is sized once: kv_cache_bytes if given, else kv_cache_memory_fraction of the
    GPU's free memory, else (CPU) 256 MiB; it is cut into blocks of block_size tokens.
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        block_size: int = 16,
        kv_cache_bytes: int | None = None,
        kv_cache_memory_fraction: float | None = None,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.runner = ModelRunner(checkpoint_dir, torch.device(device), dtype)
        self.config = self.runner.config
        text = self.config.text_config
        self.vocab_size = text.vocab_size
        self.hidden_size = text.hidden_size
        self.max_model_len = text.max_position_embeddings
        self.media_token_ids = (self.config.image_token_id, self.config.video_token_id)
        budget = kv_cache_budget(self.runner.device, kv_cache_bytes, kv_cache_memory_fraction)
        num_blocks = budget // self.runner.kv_bytes_per_block(block_size)
        if num_blocks < 1:
            raise ValueError(f"a KV cache of {budget} bytes holds no block of {block_size} tokens")
        self.runner.allocate_kv_cache(num_blocks, block_size)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(max_num_seqs, max_num_batched_tokens, self.max_model_len, self.blocks)
        self.sampler = Sampler()
        self.stats = EngineStats()
        # add_request/abort only queue work under the lock; step() applies it, so callers never
        # wait for a forward pass and the scheduler is touched by the stepping thread alone.
        self._lock = threading.Lock()
        self._inbox: list[Sequence | str] = []  # a Sequence to add or a request id to abort
        self._live: dict[str, int] = {}  # request id -> seq_id, until finished or aborted

    def add_request(
        self,
        request_id: str,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        rope_delta: int,
        media_embeds: np.ndarray | None,
        sampling: SamplingParams,
        media_hashes: MediaHashes | None = None,
    ) -> None:
        """Queue a request; raises InvalidRequest (a ValueError) for inputs that cannot run.

        media_hashes names the content of each image/video (e.g. a hash of the file) so the
        prefix cache can reuse the KV of its pad tokens: one string per run of pad tokens, or
        (string, number of pad tokens) pairs, in prompt order. Without it the media embedding
        rows themselves are hashed.
        """
        seq = self._new_sequence(request_id, input_ids, position_ids, rope_delta, media_embeds, sampling, media_hashes)
        with self._lock:
            if request_id in self._live:
                raise InvalidRequest(f"request id {request_id!r} is already running")
            self._live[request_id] = seq.seq_id
            self._inbox.append(seq)

    def abort(self, request_id: str) -> None:
        """Drop a request; it frees its slot and cache at the next step and emits nothing more."""
        with self._lock:
            self._live.pop(request_id, None)
            self._inbox.append(request_id)

    def has_unfinished(self) -> bool:
        # The scheduler check is a read of two containers, safe from any thread under the GIL.
        with self._lock:
            return bool(self._inbox) or self.scheduler.has_unfinished()

    def live_request_ids(self) -> list[str]:
        """Requests added and neither finished nor aborted."""
        with self._lock:
            return list(self._live)

    def kv_blocks_total(self) -> int:
        return self.blocks.num_blocks

    def kv_blocks_used(self) -> int:
        """Blocks referenced by a request; unreferenced prefix-cache blocks count as free."""
        return self.blocks.num_used_blocks

    def step(self) -> list[StepOutput]:
        """Run one batched forward; one output per sequence that produced a token."""
        self._apply_inbox()
        chunks = self.scheduler.schedule()
        if not chunks:
            self._record_state()
            return []
        logits = self.runner.run(chunks)
        sampled = [chunk.seq for chunk in chunks if chunk.samples]
        tokens = self.sampler(logits, sampled)
        finished = self.scheduler.postprocess(chunks, tokens)
        if finished:
            with self._lock:
                for seq in finished:
                    # The id may already name a newer request (aborted and re-added).
                    if self._live.get(seq.request_id) == seq.seq_id:
                        del self._live[seq.request_id]
        self.stats.record_step(len(chunks), sum(chunk.num_tokens for chunk in chunks))
        self._record_state()
        return [
            StepOutput(
                seq.request_id, token, seq.is_finished, seq.finish_reason, seq.num_prompt_tokens, seq.num_output_tokens,
                seq.num_prefix_hit_tokens,
            )
            for seq, token in zip(sampled, tokens)
        ]

    def _record_state(self) -> None:
        stats = self.stats
        stats.num_running = len(self.scheduler.running)
        stats.num_waiting = len(self.scheduler.waiting)
        stats.preemptions = self.scheduler.num_preemptions
        stats.prefix_cache_hit_tokens = self.blocks.hit_tokens
        stats.prefix_cache_query_tokens = self.blocks.query_tokens

    def _apply_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for item in inbox:
            if isinstance(item, Sequence):
                self.scheduler.add(item)
            else:
                self.scheduler.abort(item)

    def _new_sequence(
        self,
        request_id: str,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        rope_delta: int,
        media_embeds: np.ndarray | None,
        sampling: SamplingParams,
        media_hashes: MediaHashes | None,
    ) -> Sequence:
        ids = np.asarray(input_ids).reshape(-1)
        if ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise InvalidRequest("input_ids must be a non-empty array of token ids")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise InvalidRequest(f"input_ids must lie in [0, {self.vocab_size})")
        # The same context policy as the `vlm` model's: a request that does not fit is refused, not cut short.
        max_tokens_for(sampling.max_tokens, ids.size, self.max_model_len, sampling.max_tokens)
        # The last sampled token never runs through the model, so it takes no KV slot.
        kv_tokens = ids.size + sampling.max_tokens - 1
        if self.blocks.blocks_for(kv_tokens) > self.blocks.num_blocks:
            raise InvalidRequest(
                f"prompt of {ids.size} tokens plus max_tokens {sampling.max_tokens} needs "
                f"{self.blocks.blocks_for(kv_tokens)} KV cache blocks, more than the {self.blocks.num_blocks} there are"
            )
        positions = np.asarray(position_ids, dtype=np.int64)
        if positions.shape != (3, ids.size):
            raise InvalidRequest(f"position_ids must be [3, {ids.size}], got {list(positions.shape)}")
        media_positions = np.flatnonzero(np.isin(ids, self.media_token_ids))
        rows = 0 if media_embeds is None else len(media_embeds)
        if rows != media_positions.size:
            raise InvalidRequest(f"{media_positions.size} image/video pad tokens but {rows} media embedding rows")
        embeds = None
        if media_embeds is not None and rows:
            if media_embeds.ndim != 2 or media_embeds.shape[1] != self.hidden_size:
                raise InvalidRequest(f"media_embeds must be [n, {self.hidden_size}], got {list(media_embeds.shape)}")
            embeds = torch.from_numpy(np.ascontiguousarray(media_embeds)).to(self.runner.device, self.runner.dtype)
        spans = _media_spans(media_positions, media_embeds, media_hashes)
        return Sequence(request_id, ids, positions, int(rope_delta), embeds, media_positions, spans, sampling)


def _media_spans(
    media_positions: np.ndarray, media_embeds: np.ndarray | None, media_hashes: MediaHashes | None
) -> list[MediaSpan]:
    """Which medium each media embedding row comes from, keyed by its content hash."""
    # Runs of consecutive pad tokens: one per image or video in a Qwen2-VL prompt.
    run_starts = np.flatnonzero(np.diff(media_positions, prepend=-2) != 1).tolist()
    runs = list(zip(run_starts, np.diff(run_starts + [media_positions.size]).tolist()))
    if media_hashes is None:
        return [MediaSpan(media_content_hash(media_embeds[lo : lo + n]), lo, n) for lo, n in runs]
    hashes = list(media_hashes)
    if all(isinstance(h, str) for h in hashes):
        if len(hashes) != len(runs):
            raise InvalidRequest(f"{len(hashes)} media hashes for {len(runs)} runs of image/video pad tokens")
        return [MediaSpan(h, lo, n) for h, (lo, n) in zip(hashes, runs)]
    spans, row = [], 0
    for item in hashes:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], (int, np.integer)) and item[1] > 0):
            raise InvalidRequest(f"media_hashes entries must be strings or (hash, number of pad tokens), got {item!r}")
        spans.append(MediaSpan(item[0], row, int(item[1])))
        row += int(item[1])
    if row != media_positions.size:
        raise InvalidRequest(f"media_hashes cover {row} pad tokens but the prompt has {media_positions.size}")
    return spans
