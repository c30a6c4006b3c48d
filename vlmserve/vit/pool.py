"""A pool of ViT servers (tritonservers hosting the `encode` model) that the LLM host calls over gRPC, and
optionally the LLM host's own `encode` model (the endpoint `local`, reached through BLS).

An endpoint named by a host name that resolves to several addresses (a Kubernetes headless Service, a
compose service run with --scale) stands for each of them: the names are resolved again every
RESOLVE_INTERVAL_S, so servers added or removed behind a name gain or lose their share of the calls.
Each call goes to the healthy endpoint with the fewest calls outstanding, the next in turn among equals (so
calls that never overlap still take turns, and a server that is back gets its share at once). A call that
fails because its endpoint went away (unreachable, stopping, its model not ready or its process dead) marks
the endpoint down and is retried once on another; an endpoint that is down gets no calls until its health
check (Triton's model readiness; for `local`, an empty image its `encode` model must refuse) passes again,
every HEALTH_INTERVAL_S. With no endpoint left a call raises Unavailable, which the proxy answers with 503
and Retry-After. Any other failure is the request's own: an InvalidRequest (bad media) or an error, not
retried.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from vlmserve.contracts import ENCODE, invalid_request_message, is_unavailable_message
from vlmserve.errors import InvalidRequest, Unavailable
from vlmserve.grpc_channel import CHANNEL_ARGS
from vlmserve.media.settings import MediumOptions
from vlmserve.media.vision import Infer, Medium, options_inputs

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
    sent_bytes: int = 0  # tensor bytes of the requests: the media and their options
    received_bytes: int = 0  # tensor bytes of the answers: the grids and embeddings


class _EndpointGone(Exception):
    pass


@dataclass(eq=False)
class Endpoint:
    """A ViT server reached over gRPC."""

    url: str  # host:port of the server's gRPC endpoint
    name: str  # the --vit-endpoints entry it came from (the url itself, or a name that resolves to several)
    healthy: bool = True
    stats: EndpointStats = field(default_factory=EndpointStats)
    _client: grpcclient.InferenceServerClient | None = None

    @property
    def client(self) -> grpcclient.InferenceServerClient:
        if self._client is None:  # created on first use, inside the loop that uses it (grpc.aio binds to it)
            self._client = grpcclient.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        return self._client

    async def infer(self, inputs: Mapping[str, np.ndarray], timeout_s: float) -> dict[str, np.ndarray]:
        """One `encode` call; _EndpointGone when the server went away, InvalidRequest for bad media."""
        request = []
        for name, value in inputs.items():
            tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            tensor.set_data_from_numpy(value)
            request.append(tensor)
        outputs = [grpcclient.InferRequestedOutput(spec.name) for spec in ENCODE.outputs]
        try:
            result = await self.client.infer(ENCODE.NAME, request, outputs=outputs, client_timeout=timeout_s)
        except InferenceServerException as exc:
            message = exc.message() or str(exc)
            user_message = invalid_request_message(message)
            if user_message is not None:
                raise InvalidRequest(user_message) from None
            if exc.status() in _GONE_STATUSES or is_unavailable_message(message):
                raise _EndpointGone(message) from None
            raise RuntimeError(f"ViT server {self.url}: {message}") from None
        return {spec.name: result.as_numpy(spec.name) for spec in ENCODE.outputs}

    async def ready(self, timeout_s: float) -> bool:
        try:
            return await self.client.is_model_ready(ENCODE.NAME, client_timeout=timeout_s)
        except InferenceServerException:
            return False

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


@dataclass(eq=False)
class LocalEndpoint(Endpoint):
    """This tritonserver's own `encode` model, reached through BLS (`infer`)."""

    local_infer: Infer | None = None

    async def infer(self, inputs: Mapping[str, np.ndarray], timeout_s: float) -> dict[str, np.ndarray]:
        try:
            return await self.local_infer(ENCODE.NAME, inputs, [spec.name for spec in ENCODE.outputs])
        except RuntimeError as exc:  # raise_for_error's; InvalidRequest passes as it is
            if is_unavailable_message(str(exc)):
                raise _EndpointGone(str(exc)) from None
            raise

    async def ready(self, timeout_s: float) -> bool:
        """Whether the model answers at all: an empty image must come back refused by its own code."""
        try:
            await self.local_infer(ENCODE.NAME, options_inputs(Medium(MediumOptions("image"), b"")),
                                   [ENCODE.GRID_THW.name])
        except InvalidRequest:
            return True
        except Exception:
            return False
        return False

    async def close(self) -> None:
        pass


def _tensor_bytes(value: np.ndarray) -> int:
    if value.dtype == np.object_:  # BYTES elements: their own lengths
        return sum(len(element) for element in value.reshape(-1))
    return value.nbytes


async def _addresses(name: str) -> list[str] | None:
    """The host:port of every address `name` (host:port) resolves to, its IPv4 ones where it has any (so that
    `localhost` is one server, not two); None when the lookup fails."""
    host, _, port = name.rpartition(":")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except OSError:
        return None
    ips = sorted({info[4][0] for info in infos if info[0] == socket.AF_INET}) or sorted({info[4][0] for info in infos})
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]


# The endpoint that stands for this tritonserver's own `encode` model.
LOCAL = "local"


def parse_endpoints(text: str) -> list[str]:
    """`host:port,host:port` (and `local`) -> the list; ValueError for an entry that is neither."""
    urls = [url.strip() for url in text.split(",") if url.strip()]
    for url in urls:
        host, _, port = url.rpartition(":")
        if url != LOCAL and (not host or not port.isdigit()):
            raise ValueError(f"a ViT endpoint is host:port or {LOCAL}, got {url!r}")
    return urls


class VitPool:
    HEALTH_INTERVAL_S = 1.0
    RESOLVE_INTERVAL_S = 10.0
    CALL_TIMEOUT_S = 300.0  # a server that hangs this long counts as gone

    def __init__(self, urls: list[str], local: Infer | None = None) -> None:
        """``local``: how this tritonserver's own models are called, for the endpoint `local`."""
        if not urls:
            raise ValueError("a ViT pool needs at least one endpoint")
        if LOCAL in urls and local is None:
            raise ValueError(f"the endpoint {LOCAL} needs a way to call the local models")
        self.names = urls
        self.local = local
        self.endpoints = [self._endpoint(url, url) for url in urls]
        self._health_task: asyncio.Task | None = None
        self._resolved: asyncio.Event | None = None
        self._turns = itertools.count()

    async def encode(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One `encode` call (inputs by name) -> its outputs by name, on the least loaded healthy endpoint."""
        if self._health_task is None or self._health_task.done():  # the first call: watch the servers from now
            self._resolved = asyncio.Event()
            self._health_task = asyncio.get_running_loop().create_task(self._watch(self._resolved))
        await self._resolved.wait()
        tried: list[Endpoint] = []
        for _ in range(2):  # the first endpoint, and once more on another if that one went away
            candidates = [e for e in self.endpoints if e.healthy and e not in tried]
            if not candidates:
                break
            turn = next(self._turns) % len(candidates)
            endpoint = min(candidates[turn:] + candidates[:turn], key=lambda e: e.stats.in_flight)
            try:
                return await self._call(endpoint, inputs)
            except _EndpointGone as gone:
                logger.warning("ViT server %s went away (%s); it gets no calls until it is ready again",
                               endpoint.url, gone)
                endpoint.healthy = False
                tried.append(endpoint)
        # The client hears what is missing, not where the servers are.
        raise Unavailable("no ViT server can encode images or videos now")

    async def _call(self, endpoint: Endpoint, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        stats = endpoint.stats
        stats.calls += 1
        stats.sent_bytes += sum(map(_tensor_bytes, inputs.values()))
        stats.in_flight += 1
        started = time.monotonic()
        try:
            outputs = await endpoint.infer(inputs, self.CALL_TIMEOUT_S)
        except Exception:
            stats.failures += 1
            raise
        finally:
            stats.in_flight -= 1
            stats.latency_s += time.monotonic() - started
        stats.received_bytes += sum(map(_tensor_bytes, outputs.values()))
        return outputs

    def _endpoint(self, url: str, name: str) -> Endpoint:
        return LocalEndpoint(url, name, local_infer=self.local) if url == LOCAL else Endpoint(url, name)

    async def _resolve(self) -> None:
        """The endpoints behind the names: a name with several addresses stands for each; one whose lookup
        fails keeps what it had."""
        found: dict[str, str] = {}  # url -> the name it came from
        for name in self.names:
            addresses = [name] if name == LOCAL else await _addresses(name)
            if addresses is None:  # the lookup failed: keep this name's endpoints as they are
                found.update((e.url, name) for e in self.endpoints if e.name == name)
            elif len(addresses) > 1:
                found.update((address, name) for address in addresses)
            else:
                found[name] = name
        known = {e.url: e for e in self.endpoints}
        self.endpoints = [known.pop(url, None) or self._endpoint(url, name) for url, name in found.items()]
        for gone in known.values():  # calls in flight there finish on their own
            await gone.close()

    async def _watch(self, resolved: asyncio.Event) -> None:
        """Resolve the names (`resolved` is set then), and from then on bring back every endpoint that is down
        once its `encode` model is ready again, and follow the names."""
        try:
            await self._resolve()
        finally:
            resolved.set()
        resolved_at = time.monotonic()
        while True:
            await asyncio.sleep(self.HEALTH_INTERVAL_S)
            if time.monotonic() - resolved_at >= self.RESOLVE_INTERVAL_S:
                await self._resolve()
                resolved_at = time.monotonic()
            for endpoint in self.endpoints:
                if not endpoint.healthy and await endpoint.ready(self.HEALTH_INTERVAL_S):
                    logger.warning("ViT server %s is ready again", endpoint.url)
                    endpoint.healthy = True

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        for endpoint in self.endpoints:
            await endpoint.close()
