"""Engine counters a Triton model can export as metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineStats:
    steps: int = 0  # steps that ran the model
    scheduled_tokens: int = 0  # tokens run through the model, prefill and decode
    batched_sequences: int = 0  # sum over steps of the sequences in the step's batch
    max_batch_size: int = 0
    batch_size_histogram: dict[int, int] = field(default_factory=dict)  # batch size -> steps
    last_batch_size: int = 0
    last_num_tokens: int = 0
    # As of the end of the last step:
    num_running: int = 0
    num_waiting: int = 0  # new and preempted requests
    preemptions: int = 0
    prefix_cache_hit_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    prefix_cache_query_tokens: int = 0  # prompt tokens of admitted sequences

    @property
    def mean_batch_size(self) -> float:
        return self.batched_sequences / self.steps if self.steps else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hit_tokens / self.prefix_cache_query_tokens if self.prefix_cache_query_tokens else 0.0

    def record_step(self, batch_size: int, num_tokens: int) -> None:
        self.steps += 1
        self.scheduled_tokens += num_tokens
        self.batched_sequences += batch_size
        self.max_batch_size = max(self.max_batch_size, batch_size)
        self.batch_size_histogram[batch_size] = self.batch_size_histogram.get(batch_size, 0) + 1
        self.last_batch_size = batch_size
        self.last_num_tokens = num_tokens
