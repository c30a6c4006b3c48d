"""Each ViT server's figures as Triton custom metrics of the LLM host (on Triton's /metrics), labelled with the
endpoint: calls, failures, calls in flight, summed latency and whether it takes calls. Inside tritonserver only."""

from __future__ import annotations

import threading

import triton_python_backend_utils as pb_utils

from vlmserve.vit.pool import EndpointStats, VitPool


class VitPoolMetrics:
    PUBLISH_INTERVAL_S = 0.5

    def __init__(self, pool: VitPool) -> None:
        self.pool = pool
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        # A Metric is only valid while its MetricFamily lives.
        described = {
            "calls": ("vlm_vit_endpoint_calls_total", counter, "encode calls sent"),
            "failures": ("vlm_vit_endpoint_failures_total", counter, "encode calls that failed"),
            "latency_s": ("vlm_vit_endpoint_latency_seconds_total", counter,
                          "Seconds the encode calls took, summed (the mean: over the calls)"),
            "in_flight": ("vlm_vit_endpoint_in_flight", gauge, "encode calls outstanding"),
            "up": ("vlm_vit_endpoint_up", gauge, "1 while the endpoint takes calls"),
        }
        self.families = {key: pb_utils.MetricFamily(name=name, description=description, kind=kind)
                         for key, (name, kind, description) in described.items()}
        self.metrics = {endpoint.url: {name: family.Metric(labels={"endpoint": endpoint.url})
                                       for name, family in self.families.items()} for endpoint in pool.endpoints}
        self.published = {endpoint.url: EndpointStats() for endpoint in pool.endpoints}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._publish_loop, name="vit-pool-metrics", daemon=True)
        self._thread.start()

    def publish(self) -> None:
        for endpoint in self.pool.endpoints:
            # A copy: the loop thread keeps counting meanwhile.
            stats, metrics = EndpointStats(**vars(endpoint.stats)), self.metrics[endpoint.url]
            for name in ("calls", "failures", "latency_s"):  # counters take the increase
                metrics[name].increment(getattr(stats, name) - getattr(self.published[endpoint.url], name))
            metrics["in_flight"].set(stats.in_flight)
            metrics["up"].set(1 if endpoint.healthy else 0)
            self.published[endpoint.url] = stats

    def _publish_loop(self) -> None:
        while not self._stopped.wait(self.PUBLISH_INTERVAL_S):
            self.publish()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        self.publish()
