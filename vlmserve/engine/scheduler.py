"""Iteration-level scheduling: which tokens of which sequences run in the next step."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from vlmserve.engine.block_manager import BlockManager
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
    """Waiting and running queues, and who holds which KV blocks.

    Every step decodes each running sequence by one token, continues chunked prefills, then
    admits waiting sequences while there are free slots (max_num_seqs), token budget
    (max_num_batched_tokens) and KV blocks; a prompt larger than what is left of the budget is
    prefilled in chunks over several steps, so decoding never stalls behind a long prompt. A
    waiting sequence starts after the longest prefix of its blocks already in the prefix cache.

    When a running sequence needs a block and none is free, the running sequence scheduled last
    is preempted: its blocks are freed and it goes back to the front of the waiting queue, to be
    recomputed (prompt + output so far) once blocks are free again.
    """

    def __init__(
        self, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, blocks: BlockManager
    ) -> None:
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
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Chunk]:
        budget = self.max_num_batched_tokens
        chunks = []
        # Decodes (1 token each) first, then prefill chunks of sequences already running; victims
        # of preemption come from the back of this order.
        queue = deque(sorted(self.running, key=lambda s: s.num_uncached_tokens > 1))
        preempted = False
        while queue and budget > 0:
            seq = queue.popleft()
            while self.blocks.free_capacity(seq) == 0:
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                # A prefill chunk shrinks to the blocks there are rather than preempt more.
                num_tokens = min(seq.num_uncached_tokens, budget, self.blocks.free_capacity(seq))
                chunks.append(self._schedule_chunk(seq, num_tokens))
                budget -= num_tokens
        # Admitting right after a preemption would only take the blocks just freed back.
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.blocks.match_prefix(seq)
            num_tokens = min(seq.num_tokens - len(cached) * self.blocks.block_size, budget)
            new_blocks = self.blocks.blocks_for(len(cached) * self.blocks.block_size + num_tokens) - len(cached)
            if not self.blocks.can_admit(cached, new_blocks):
                break
            self.waiting.popleft()
            self.blocks.admit(seq, cached)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(self._schedule_chunk(seq, num_tokens))
            budget -= num_tokens
        return chunks

    def _schedule_chunk(self, seq: Sequence, num_tokens: int) -> Chunk:
        start = seq.num_cached_tokens
        end = start + num_tokens
        self.blocks.grow(seq, end)
        return Chunk(seq, start, end, samples=end == seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, chunks: list[Chunk], tokens: list[int]) -> list[Sequence]:
        """Record a step's results (tokens: one per sampling chunk, in order); returns the
        sequences that finished, already out of the running queue with their blocks freed."""
        new_tokens = iter(tokens)
        finished = []
        for chunk in chunks:
            seq = chunk.seq
            seq.mark_cached(chunk.num_tokens)
            self.blocks.publish(seq)
            if not chunk.samples:
                continue
            token = next(new_tokens)
            seq.append_token(token)
            if token in seq.sampling.stop_token_ids:
                seq.finish("stop")
            elif seq.num_output_tokens >= seq.sampling.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish("length")
            if seq.is_finished:
                self.blocks.free(seq)
                finished.append(seq)
        if finished:
            self.running = [seq for seq in self.running if not seq.is_finished]
        return finished

    def abort(self, request_id: str) -> Sequence | None:
        """Remove the sequence of request_id from either queue and free its blocks; returns it
        (None if unknown)."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.blocks.free(seq)
                    seq.finish("abort")
                    return seq
        return None
