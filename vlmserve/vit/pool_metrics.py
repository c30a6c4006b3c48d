"""Each ViT server's figures as Triton custom metrics of the LLM host (on Triton's /metrics), labelled with the
endpoint: calls, failures, calls in flight, summed latency, bytes each way and whether it takes calls. Inside
tritonserver only."""

from __future__ import annotations

import threading

import triton_python_backend_utils as pb_utils

from vlmserve.vit.pool import Endpoint, EndpointStats, VitPool


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
            "sent_bytes": ("vlm_vit_endpoint_sent_bytes_total", counter, "Bytes of media and options sent"),
            "received_bytes": ("vlm_vit_endpoint_received_bytes_total", counter,
                               "Bytes of grids and embeddings received"),
            "in_flight": ("vlm_vit_endpoint_in_flight", gauge, "encode calls outstanding"),
            "up": ("vlm_vit_endpoint_up", gauge, "1 while the endpoint takes calls"),
        }
        self.families = {key: pb_utils.MetricFamily(name=name, description=description, kind=kind)
                         for key, (name, kind, description) in described.items()}
        self.metrics: dict[str, dict] = {}  # by endpoint url (the pool's endpoints follow DNS): by figure
        self.published: dict[str, tuple[Endpoint, EndpointStats]] = {}  # what the counters say, of which endpoint
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._publish_loop, name="vit-pool-metrics", daemon=True)
        self._thread.start()

    def publish(self) -> None:
        endpoints = list(self.pool.endpoints)
        for url in set(self.metrics) - {endpoint.url for endpoint in endpoints}:  # no longer behind a name
            self.metrics[url]["up"].set(0)
            self.metrics[url]["in_flight"].set(0)
        for endpoint in endpoints:
            if endpoint.url not in self.metrics:
                self.metrics[endpoint.url] = {name: family.Metric(labels={"endpoint": endpoint.url})
                                              for name, family in self.families.items()}
            # A copy: the loop thread keeps counting meanwhile.
            stats, metrics = EndpointStats(**vars(endpoint.stats)), self.metrics[endpoint.url]
            before, published = self.published.get(endpoint.url, (endpoint, EndpointStats()))
            if before is not endpoint:  # the same address came back behind a name: its counts start again
                published = EndpointStats()
            for name in ("calls", "failures", "latency_s", "sent_bytes", "received_bytes"):  # the increase
                metrics[name].increment(getattr(stats, name) - getattr(published, name))
            metrics["in_flight"].set(stats.in_flight)
            metrics["up"].set(1 if endpoint.healthy else 0)
            self.published[endpoint.url] = (endpoint, stats)

    def _publish_loop(self) -> None:
        while not self._stopped.wait(self.PUBLISH_INTERVAL_S):
            self.publish()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        self.publish()
