"""A pool of ViT servers (tritonservers hosting the `encode` model) that the LLM host calls over gRPC.

Each call goes to the healthy endpoint with the fewest calls outstanding. A call that fails because its
endpoint went away (unreachable, stopping, its model not ready or its process dead) marks the endpoint down
and is retried once on another; an endpoint that is down gets no calls until its health check (Triton's
model readiness, every HEALTH_INTERVAL_S) passes again. With no endpoint left a call raises Unavailable,
which the proxy answers with 503 and Retry-After. Any other failure is the request's own: an InvalidRequest
(bad media) or an error, not retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from vlmserve.contracts import ENCODE, invalid_request_message, is_unavailable_message
from vlmserve.errors import InvalidRequest, Unavailable

logger = logging.getLogger(__name__)

# gRPC statuses of an endpoint that cannot be reached, went away mid-call, or hangs.
_GONE_STATUSES = {str(code) for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                         grpc.StatusCode.DEADLINE_EXCEEDED)}


@dataclass
class EndpointStats:
    calls: int = 0
    failures: int = 0
    in_flight: int = 0
    latency_s: float = 0.0  # summed over the calls that returned (answered or failed)


@dataclass
class Endpoint:
    url: str  # host:port of the server's gRPC endpoint
    healthy: bool = True
    stats: EndpointStats = field(default_factory=EndpointStats)
    _client: grpcclient.InferenceServerClient | None = None

    @property
    def client(self) -> grpcclient.InferenceServerClient:
        if self._client is None:  # created on first use, inside the loop that uses it (grpc.aio binds to it)
            self._client = grpcclient.InferenceServerClient(self.url)
        return self._client


class _EndpointGone(Exception):
    pass


def parse_endpoints(text: str) -> list[str]:
    """`host:port,host:port` -> the list; ValueError for an entry that is not host:port."""
    urls = [url.strip() for url in text.split(",") if url.strip()]
    for url in urls:
        host, _, port = url.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a ViT endpoint is host:port, got {url!r}")
    return urls


class VitPool:
    HEALTH_INTERVAL_S = 1.0
    CALL_TIMEOUT_S = 300.0  # a server that hangs this long counts as gone

    def __init__(self, urls: list[str]) -> None:
        if not urls:
            raise ValueError("a ViT pool needs at least one endpoint")
        self.endpoints = [Endpoint(url) for url in urls]
        self._health_task: asyncio.Task | None = None

    async def encode(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One `encode` call (inputs by name) -> its outputs by name, on the least loaded healthy endpoint."""
        self._watch_health()
        tried: list[Endpoint] = []
        for _ in range(2):  # the first endpoint, and once more on another if that one went away
            candidates = [e for e in self.endpoints if e.healthy and e not in tried]
            if not candidates:
                break
            endpoint = min(candidates, key=lambda e: e.stats.in_flight)
            try:
                return await self._call(endpoint, inputs)
            except _EndpointGone as gone:
                logger.warning("ViT server %s went away (%s); it gets no calls until it is ready again",
                               endpoint.url, gone)
                endpoint.healthy = False
                tried.append(endpoint)
        raise Unavailable("no ViT server can encode images or videos now" +
                          (f" ({', '.join(e.url for e in tried)} went away)" if tried else ""))

    async def _call(self, endpoint: Endpoint, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = []
        for name, value in inputs.items():
            tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            tensor.set_data_from_numpy(value)
            request.append(tensor)
        outputs = [grpcclient.InferRequestedOutput(spec.name) for spec in ENCODE.outputs]
        stats = endpoint.stats
        stats.calls += 1
        stats.in_flight += 1
        started = time.monotonic()
        try:
            result = await endpoint.client.infer(ENCODE.NAME, request, outputs=outputs,
                                                 client_timeout=self.CALL_TIMEOUT_S)
        except InferenceServerException as exc:
            stats.failures += 1
            message = exc.message() or str(exc)
            user_message = invalid_request_message(message)
            if user_message is not None:
                raise InvalidRequest(user_message) from None
            if exc.status() in _GONE_STATUSES or is_unavailable_message(message):
                raise _EndpointGone(message) from None
            raise RuntimeError(f"ViT server {endpoint.url}: {message}") from None
        finally:
            stats.in_flight -= 1
            stats.latency_s += time.monotonic() - started
        return {spec.name: result.as_numpy(spec.name) for spec in ENCODE.outputs}

    def _watch_health(self) -> None:
        if self._health_task is None or self._health_task.done():
            self._health_task = asyncio.get_running_loop().create_task(self._check_health())

    async def _check_health(self) -> None:
        """Bring back every endpoint that is down once its `encode` model is ready again."""
        while True:
            await asyncio.sleep(self.HEALTH_INTERVAL_S)
            for endpoint in self.endpoints:
                if not endpoint.healthy and await self._ready(endpoint):
                    logger.warning("ViT server %s is ready again", endpoint.url)
                    endpoint.healthy = True

    async def _ready(self, endpoint: Endpoint) -> bool:
        try:
            return await endpoint.client.is_model_ready(ENCODE.NAME, client_timeout=self.HEALTH_INTERVAL_S)
        except InferenceServerException:
            return False

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        for endpoint in self.endpoints:
            if endpoint._client is not None:
                await endpoint._client.close()
