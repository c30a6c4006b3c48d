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

    @property
    def mean_batch_size(self) -> float:
        return self.batched_sequences / self.steps if self.steps else 0.0

    def record_step(self, batch_size: int, num_tokens: int) -> None:
        self.steps += 1
        self.scheduled_tokens += num_tokens
        self.batched_sequences += batch_size
        self.max_batch_size = max(self.max_batch_size, batch_size)
        self.batch_size_histogram[batch_size] = self.batch_size_histogram.get(batch_size, 0) + 1
        self.last_batch_size = batch_size
        self.last_num_tokens = num_tokens
