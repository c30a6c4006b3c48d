"""Prometheus metrics of the proxy (served at /metrics): requests by status, latency, time to first token."""

from __future__ import annotations

import time
from collections.abc import Collection

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Status recorded for a request whose client went away before any answer (nginx's convention).
CLIENT_CLOSED_REQUEST = 499
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class ProxyMetrics:
    """One registry per app, so that several apps in one process (tests) keep their own counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("vlm_proxy_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("vlm_proxy_request_duration_seconds",
                                 "Time from request to the end of the response (whole stream included)",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.time_to_first_token = Histogram("vlm_proxy_time_to_first_token_seconds",
                                             "Time from request to the first generated text",
                                             ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stream_errors = Counter("vlm_proxy_stream_errors", "Streams that ended with an error event, by code",
                                     ["code"], registry=self.registry)
        self.in_flight = Gauge("vlm_proxy_requests_in_flight", "Generation requests in flight (streams included)",
                               registry=self.registry)

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Counts every HTTP request by status and times it; `routes` are labelled by path, the rest as "other"."""

    def __init__(self, app: ASGIApp, metrics: ProxyMetrics, routes: Collection[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"  # bounded label values
        status = CLIENT_CLOSED_REQUEST
        started = time.perf_counter()

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except Exception:
            status = 500  # what Starlette's outermost handler answers
            raise
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
