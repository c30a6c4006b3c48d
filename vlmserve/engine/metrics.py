"""The engine's counters as Triton custom metrics (served on Triton's /metrics). Inside tritonserver only."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import triton_python_backend_utils as pb_utils

from vlmserve.engine.vllm_engine import VllmEngine


class EngineMetrics:
    """Every metric update is a round trip to the Triton process that holds the GIL throughout (a whole
    publish took ~0.5 ms on a 2-core host; at 10 a second it was a seventh of the `vlm` model's Python time
    on the reference workload), so while the engine runs only the figures that changed go out, every
    PUBLISH_INTERVAL_S (scrapes come seconds apart). While it is idle the figures are checked every
    CHECK_INTERVAL_S, so the first figures of a busy spell go out at once; the idle engine's go out within
    PUBLISH_INTERVAL_S of the end of its work, and then they are exact. A thread of its own publishes them
    until `stop`; while the engine is busy it wakes only to publish (every wake-up takes the GIL from the
    threads that carry the tokens: at 50 a second it cost 5-10% of the model's CPU on the reference workload)."""

    PUBLISH_INTERVAL_S = 0.5
    CHECK_INTERVAL_S = 0.02

    def __init__(self, engine: VllmEngine, active_requests: Callable[[], int]) -> None:
        self.engine = engine
        self.active_requests = active_requests
        self.families = []  # a Metric is only valid while its MetricFamily lives

        def family(name, kind, description):
            self.families.append(pb_utils.MetricFamily(name=name, description=description, kind=kind))
            return self.families[-1].Metric(labels={})

        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self.steps = family("vlm_llm_steps_total", counter, "Engine steps run")
        self.batched = family("vlm_llm_batched_sequences_total", counter, "Sum over steps of sequences in the batch")
        self.tokens = family("vlm_llm_scheduled_tokens_total", counter, "Tokens run through the model")
        self.max_batch = family("vlm_llm_max_batch_size", gauge, "Largest number of sequences in one step")
        self.active = family("vlm_llm_active_requests", gauge, "Requests being served, media encoding included")
        self.running = family("vlm_llm_running_requests", gauge, "Requests prefilling or decoding")
        self.waiting = family("vlm_llm_waiting_requests", gauge, "Requests waiting for a batch slot or KV blocks")
        self.step_tokens = family("vlm_llm_tokens_per_step", gauge, "Tokens run through the model in the last step")
        self.blocks_used = family("vlm_llm_kv_blocks_used", gauge, "KV cache blocks held by requests")
        self.blocks_total = family("vlm_llm_kv_blocks_total", gauge, "KV cache blocks in the pool")
        self.blocks_total.set(engine.kv_blocks_total)
        self.prefix_hits = family("vlm_llm_prefix_cache_hit_tokens_total", counter,
                                  "Prompt tokens whose KV came from the prefix cache")
        self.prefix_queries = family("vlm_llm_prefix_cache_query_tokens_total", counter,
                                     "Prompt tokens looked up in the prefix cache (hit rate: hits / queries)")
        self.preemptions = family("vlm_llm_preemptions_total", counter, "Requests preempted for lack of KV blocks")
        # EngineStats field -> counter; the stats keep running totals, a counter takes the increase.
        # Steps go last: whoever sees the step count move sees the rest of that publish too.
        self._counters = {"batched_sequences": self.batched, "scheduled_tokens": self.tokens,
                          "prefix_cache_hit_tokens": self.prefix_hits,
                          "prefix_cache_query_tokens": self.prefix_queries, "preemptions": self.preemptions,
                          "steps": self.steps}
        self._exported = dict.fromkeys(self._counters, 0)
        self._published_at = 0.0
        self._published: tuple = ()
        self._published_idle = True
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._publish_loop, name="vlm-metrics", daemon=True)
        self._thread.start()

    def publish(self) -> None:
        stats = self.engine.stats
        active = self.active_requests()
        idle = active == 0
        gauges = [(self.active, active), (self.max_batch, stats.max_batch_size),
                  (self.running, stats.num_running), (self.waiting, stats.num_waiting),
                  (self.step_tokens, stats.last_num_tokens), (self.blocks_used, self.engine.kv_blocks_used())]
        totals = {name: getattr(stats, name) for name in self._counters}
        snapshot = (*(value for _, value in gauges), *totals.values())
        now = time.monotonic()
        # Throttled only from busy to busy: the moment work starts shows at once, and the end at the next check.
        throttled = not idle and not self._published_idle and now - self._published_at < self.PUBLISH_INTERVAL_S
        if snapshot == self._published or throttled:
            return
        previous = self._published  # the gauges' values first, in the same order (empty before the first)
        self._published_at, self._published, self._published_idle = now, snapshot, idle
        for index, (metric, value) in enumerate(gauges):
            if not previous or previous[index] != value:
                metric.set(value)
        for name, total in totals.items():
            if total > self._exported[name]:
                self._counters[name].increment(total - self._exported[name])
                self._exported[name] = total

    def _publish_loop(self) -> None:
        while not self._stopped.wait(self.CHECK_INTERVAL_S if self._published_idle else self.PUBLISH_INTERVAL_S):
            self.publish()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
