"""Iteration-level scheduling: which tokens of which sequences run in the next step."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from vlmserve.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class Chunk:
    """Tokens start..end-1 of seq run in this step; samples: they reach the sequence's end, so
    the step produces the sequence's next token (False for a non-final prefill chunk)."""

    seq: Sequence
    start: int
    end: int
    samples: bool

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


class Scheduler:
    """Waiting and running queues.

    Every step decodes each running sequence by one token, continues chunked prefills, then
    admits waiting sequences while there are free slots (max_num_seqs) and token budget
    (max_num_batched_tokens); a prompt larger than what is left of the budget is prefilled in
    chunks over several steps, so decoding never stalls behind a long prompt.
    """

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        # Each running sequence needs one token of budget a step to decode; with fewer the
        # sequences at the back of the queue could starve.
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs ({max_num_seqs})"
            )
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Chunk]:
        budget = self.max_num_batched_tokens
        chunks = []
        # Decodes (1 token each) first, then prefill chunks of sequences already running.
        for seq in sorted(self.running, key=lambda s: s.num_uncached_tokens > 1):
            if budget == 0:
                break
            chunk = self._chunk(seq, budget)
            chunks.append(chunk)
            budget -= chunk.num_tokens
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunk = self._chunk(seq, budget)
            chunks.append(chunk)
            budget -= chunk.num_tokens
        return chunks

    @staticmethod
    def _chunk(seq: Sequence, budget: int) -> Chunk:
        start = seq.num_cached_tokens
        end = start + min(seq.num_uncached_tokens, budget)
        return Chunk(seq, start, end, samples=end == seq.num_tokens)

    def postprocess(self, chunks: list[Chunk], tokens: list[int]) -> list[Sequence]:
        """Record a step's results (tokens: one per sampling chunk, in order); returns the
        sequences that finished, already out of the running queue."""
        new_tokens = iter(tokens)
        finished = []
        for chunk in chunks:
            seq = chunk.seq
            seq.mark_cached(chunk.num_tokens)
            if not chunk.samples:
                continue
            token = next(new_tokens)
            seq.append_token(token)
            if token in seq.sampling.stop_token_ids:
                seq.finish("stop")
            elif seq.num_output_tokens >= seq.sampling.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish("length")
            if seq.is_finished:
                finished.append(seq)
        if finished:
            self.running = [seq for seq in self.running if not seq.is_finished]
        return finished

    def abort(self, request_id: str) -> Sequence | None:
        """Remove the sequence of request_id from either queue; returns it (None if unknown)."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    seq.finish("abort")
                    return seq
        return None
