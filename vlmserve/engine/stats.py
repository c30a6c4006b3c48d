"""The engine's counters as the `vlm` model publishes them (Triton metrics vlm_llm_*), folded from vLLM's
per-step scheduler and iteration stats."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    steps: int = 0  # steps that ran the model
    scheduled_tokens: int = 0  # tokens run through the model, prefill and decode
    batched_sequences: int = 0  # sum over steps of the sequences in the step's batch
    max_batch_size: int = 0
    last_num_tokens: int = 0
    # As of the end of the last step:
    num_running: int = 0
    num_waiting: int = 0  # new and preempted requests
    kv_usage: float = 0.0  # share of the KV cache's blocks in use
    preemptions: int = 0
    prefix_cache_hit_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    prefix_cache_query_tokens: int = 0  # prompt tokens looked up in the prefix cache

    def record(self, scheduler, iteration) -> None:
        """Fold in one step's vLLM SchedulerStats and IterationStats (either may be None)."""
        if scheduler is not None:
            self.num_running, self.num_waiting = scheduler.num_running_reqs, scheduler.num_waiting_reqs
            self.kv_usage = scheduler.kv_cache_usage
            self.prefix_cache_hit_tokens += scheduler.prefix_cache_stats.hits
            self.prefix_cache_query_tokens += scheduler.prefix_cache_stats.queries
        if iteration is not None:
            self.preemptions += iteration.num_preempted_reqs
            tokens = iteration.num_generation_tokens + iteration.prompt_token_stats.computed
            if tokens:
                # Every sequence that sampled a token was in the step's batch, even if it finished in it
                # (and so no longer counts as running).
                batch = max(self.num_running, iteration.num_generation_tokens)
                self.steps += 1
                self.scheduled_tokens += tokens
                self.batched_sequences += batch
                self.max_batch_size = max(self.max_batch_size, batch)
                self.last_num_tokens = tokens
