"""The engine a serving loop drives: add requests from any thread, call `step()` in one."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlmserve.engine.model_runner import ModelRunner
from vlmserve.engine.sampling import Sampler, SamplingParams
from vlmserve.engine.scheduler import Scheduler
from vlmserve.engine.sequence import Sequence
from vlmserve.engine.stats import EngineStats
from vlmserve.errors import InvalidRequest


@dataclass(frozen=True)
class StepOutput:
    request_id: str
    token_id: int
    finished: bool
    finish_reason: str | None  # 'stop' | 'length' | None while running
    num_prompt_tokens: int
    num_output_tokens: int  # including token_id


class LLMEngine:
    """Iteration-level batching: requests added while others decode join at the next step."""

    def __init__(
        self,
        checkpoint_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
    ) -> None:
        self.runner = ModelRunner(checkpoint_dir, torch.device(device), dtype)
        self.config = self.runner.config
        text = self.config.text_config
        self.vocab_size = text.vocab_size
        self.hidden_size = text.hidden_size
        self.max_model_len = text.max_position_embeddings
        self.media_token_ids = (self.config.image_token_id, self.config.video_token_id)
        self.scheduler = Scheduler(max_num_seqs, max_num_batched_tokens, self.max_model_len)
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
    ) -> None:
        """Queue a request; raises InvalidRequest (a ValueError) for inputs that cannot run."""
        seq = self._new_sequence(request_id, input_ids, position_ids, rope_delta, media_embeds, sampling)
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

    def step(self) -> list[StepOutput]:
        """Run one batched forward; one output per sequence that produced a token."""
        self._apply_inbox()
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        logits = self.runner.run(chunks)
        sampled = [chunk.seq for chunk in chunks if chunk.samples]
        tokens = self.sampler(logits, sampled)
        finished = self.scheduler.postprocess(chunks, tokens)
        for seq in finished:
            self.runner.free(seq.seq_id)
        if finished:
            with self._lock:
                for seq in finished:
                    # The id may already name a newer request (aborted and re-added).
                    if self._live.get(seq.request_id) == seq.seq_id:
                        del self._live[seq.request_id]
        self.stats.record_step(len(chunks), sum(chunk.num_tokens for chunk in chunks))
        return [
            StepOutput(
                seq.request_id, token, seq.is_finished, seq.finish_reason, seq.num_prompt_tokens, seq.num_output_tokens
            )
            for seq, token in zip(sampled, tokens)
        ]

    def _apply_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for item in inbox:
            if isinstance(item, Sequence):
                self.scheduler.add(item)
                continue
            seq = self.scheduler.abort(item)
            if seq is not None:
                self.runner.free(seq.seq_id)

    def _new_sequence(
        self,
        request_id: str,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        rope_delta: int,
        media_embeds: np.ndarray | None,
        sampling: SamplingParams,
    ) -> Sequence:
        ids = np.asarray(input_ids).reshape(-1)
        if ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise InvalidRequest("input_ids must be a non-empty array of token ids")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise InvalidRequest(f"input_ids must lie in [0, {self.vocab_size})")
        if ids.size >= self.max_model_len:
            raise InvalidRequest(f"prompt of {ids.size} tokens leaves no room under max_model_len {self.max_model_len}")
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
        return Sequence(request_id, ids, positions, int(rope_delta), embeds, media_positions, sampling)
