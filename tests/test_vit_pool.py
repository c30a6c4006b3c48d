"""ViT servers over gRPC: an LLM host with no `preprocess` or `vit` of its own sends its media to two ViT-role
tritonservers (vlmserve.vit.pool). Answers match the one-host stack's, both servers get work, and losing
servers costs at most a 503 with Retry-After."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from export.repository_options import VIT_SERVER
from tests.conftest import running_stack
from tests.test_end_to_end import mp4_bytes, png_bytes
from tests.test_vit_service import vit_executions
from vlmserve.errors import InvalidRequest, Unavailable
from vlmserve.media.settings import MediumOptions
from vlmserve.media.vision import Medium, options_inputs
from vlmserve.vit import pool as pool_module
from vlmserve.vit.pool import VitPool

pytestmark = pytest.mark.timeout(900)

MAX_TOKENS = 12


class VitServers:
    """Two ViT-role stacks (tritonserver with `preprocess`, `vit` and `encode`; no proxy) on loopback. A stack
    that was stopped stays stopped: `replace` starts a new one on the same ports and repository."""

    def __init__(self, checkpoint: Path, workdirs: list[Path]) -> None:
        from launcher.deployment import prepare_cpu_repository
        from launcher.triton_server import TritonPorts

        self.places = [(prepare_cpu_repository(checkpoint, workdir, role=VIT_SERVER), workdir, TritonPorts.free())
                       for workdir in workdirs]
        self.stacks = [self._stack(i) for i in range(len(workdirs))]

    def _stack(self, i: int):
        from launcher.deployment import Stack

        repository, workdir, ports = self.places[i]
        return Stack.create(repository, workdir, ports, None)

    def replace(self, i: int) -> None:
        self.stacks[i] = self._stack(i)
        self.stacks[i].start()

    def __getitem__(self, i: int):
        return self.stacks[i]

    def __iter__(self):
        return iter(self.stacks)


@pytest.fixture(scope="module")
def vit_servers(tiny_checkpoint, tmp_path_factory):
    servers = VitServers(tiny_checkpoint, [tmp_path_factory.mktemp(f"vit-{i}") for i in range(2)])
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def llm_host(tiny_checkpoint, tmp_path_factory, vit_servers):
    endpoints = ",".join(server.triton.grpc_url for server in vit_servers)
    with running_stack(tiny_checkpoint, tmp_path_factory.mktemp("llm-host"), vit_endpoints=endpoints) as running:
        yield running


def openai_client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.proxy.base_url, api_key="unused", max_retries=0, timeout=120)


def answer(stack, content: list[dict]) -> str:
    response = openai_client(stack).chat.completions.create(
        model="tiny-qwen2-vl", messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS, temperature=0)
    return response.choices[0].message.content


def calls(stack, endpoint: str) -> float:
    """The LLM host's count of encode calls sent to ``endpoint``."""
    body = httpx.get(stack.triton.metrics_url, timeout=10).text
    match = re.search(rf'^vlm_vit_endpoint_calls_total{{endpoint="{re.escape(endpoint)}"}} ([0-9.e+]+)$', body,
                      re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_with_no_endpoint_reachable_a_call_is_unavailable_at_once():
    from launcher.processes import free_ports

    async def call() -> None:
        pool = VitPool([f"127.0.0.1:{port}" for port in free_ports(2)])
        try:
            with pytest.raises(Unavailable, match="no ViT server"):
                await pool.encode(options_inputs(Medium(MediumOptions("image"), png_bytes(28, 28, seed=1))))
            assert [e.healthy for e in pool.endpoints] == [False, False]
            assert [e.stats.failures for e in pool.endpoints] == [1, 1], "tried once on each"
        finally:
            await pool.close()

    started = time.monotonic()
    asyncio.run(call())
    assert time.monotonic() - started < 10


class FakeLocalEncode:
    """This server's own `encode` model as the BLS `infer` reaches it: it answers, or its process is dead."""

    def __init__(self) -> None:
        self.alive, self.calls = True, 0

    async def __call__(self, model, inputs, outputs):
        self.calls += 1
        if not self.alive:
            raise RuntimeError(f"{model}: Failed to process the request(s), Stub process 'encode_0_0' is not healthy.")
        if not inputs["MEDIA"][0]:
            raise InvalidRequest("image data is empty")
        return {"GRID_THW": np.asarray([1, 2, 2]), "EMBEDS": np.zeros((1, 8), np.float32)}


def test_the_local_endpoint_takes_its_share_is_left_out_while_dead_and_comes_back():
    from launcher.processes import free_ports

    local = FakeLocalEncode()
    medium = options_inputs(Medium(MediumOptions("image"), png_bytes(28, 28, seed=2)))

    async def run() -> None:
        pool = VitPool(["local", f"127.0.0.1:{free_ports(1)[0]}"], local=local)
        pool.HEALTH_INTERVAL_S = 0.1
        try:
            out = await pool.encode(medium)
            assert out["GRID_THW"].tolist() == [1, 2, 2] and local.calls == 1
            local.alive = False
            with pytest.raises(Unavailable):  # the local model's process is dead, the other server refused
                await pool.encode(medium)
            assert [e.healthy for e in pool.endpoints] == [False, False]
            local.alive = True
            deadline = time.monotonic() + 5
            while not pool.endpoints[0].healthy:  # its health check: an empty image, refused by the model's code
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert (await pool.encode(medium))["EMBEDS"].shape == (1, 8)
        finally:
            await pool.close()

    asyncio.run(run())


def test_calls_that_never_overlap_take_turns(monkeypatch):
    # The least-loaded rule alone would send every call to the first endpoint when calls come one at a time;
    # then a server that comes back got nothing until two calls overlapped.
    monkeypatch.setattr(pool_module, "_addresses", lambda name: asyncio.sleep(0, [name]))
    served: list[str] = []

    async def infer(endpoint, inputs, timeout_s):
        served.append(endpoint.url)
        return {"GRID_THW": np.asarray([1, 2, 2]), "EMBEDS": np.zeros((1, 8), np.float32)}

    monkeypatch.setattr(pool_module.Endpoint, "infer", infer)
    medium = options_inputs(Medium(MediumOptions("image"), png_bytes(28, 28, seed=3)))

    async def run() -> None:
        pool = VitPool(["a:8001", "b:8001", "c:8001"])
        try:
            for _ in range(6):
                await pool.encode(medium)
            pool.endpoints[1].stats.in_flight = 1  # busy: the others take the next calls
            for _ in range(4):
                await pool.encode(medium)
        finally:
            await pool.close()

    asyncio.run(run())
    assert sorted(served[:6]) == ["a:8001"] * 2 + ["b:8001"] * 2 + ["c:8001"] * 2
    assert sorted(served[6:]) == ["a:8001"] * 2 + ["c:8001"] * 2


def test_a_name_with_several_addresses_stands_for_each_and_is_followed(monkeypatch):
    answers = {"vit:8001": ["10.0.0.1:8001", "10.0.0.2:8001"], "localhost:9001": ["127.0.0.1:9001"]}
    monkeypatch.setattr(pool_module, "_addresses", lambda name: asyncio.sleep(0, answers[name]))

    async def follow() -> list[list[str]]:
        pool = VitPool(["vit:8001", "localhost:9001"])
        seen = []
        for change in ({}, {"vit:8001": ["10.0.0.2:8001", "10.0.0.3:8001"]}, {"vit:8001": None}):
            answers.update(change)
            await pool._resolve()
            seen.append([(e.url, e.name) for e in pool.endpoints])
        return seen

    first, scaled, lookup_failed = asyncio.run(follow())
    local = ("localhost:9001", "localhost:9001")
    assert first == [("10.0.0.1:8001", "vit:8001"), ("10.0.0.2:8001", "vit:8001"), local]
    assert scaled == [("10.0.0.2:8001", "vit:8001"), ("10.0.0.3:8001", "vit:8001"), local]
    assert lookup_failed == scaled, "a failed lookup keeps the endpoints it had"


def test_layout_the_llm_host_has_no_vision_models_and_a_vit_server_no_engine(llm_host, vit_servers):
    assert sorted(p.name for p in llm_host.triton.model_repository.iterdir()) == ["vit_cache", "vlm"]
    assert not (llm_host.triton.model_repository.parent / "vit.onnx").exists(), "no vision tower exported there"
    assert sorted(p.name for p in vit_servers[0].triton.model_repository.iterdir()) == ["encode", "preprocess", "vit"]


def test_two_images_and_a_video_answer_as_on_one_host_and_both_servers_work(llm_host, vit_servers, stack,
                                                                           media_server):
    before = [calls(llm_host, s.triton.grpc_url) for s in vit_servers]
    two_images = [{"type": "text", "text": "Compare."},
                  image(media_server.add("pool-a.png", png_bytes(112, 84, seed=301))),
                  image(media_server.add("pool-b.png", png_bytes(70, 140, seed=302)))]
    video = [{"type": "text", "text": "What happens?"},
             {"type": "video_url", "video_url": {"url": media_server.add("pool.mp4", mp4_bytes(frames=8))}}]
    for content in (two_images, video):
        assert answer(llm_host, content) == answer(stack, content)
    time.sleep(1)  # the metrics go out every half second
    after = [calls(llm_host, s.triton.grpc_url) for s in vit_servers]
    assert all(a > b for a, b in zip(after, before)), f"both ViT servers get calls: {before} -> {after}"


def test_a_video_that_cannot_fit_is_refused_before_any_vit_work(llm_host, vit_servers, media_server):
    config = httpx.get(f"http://127.0.0.1:{llm_host.triton.ports.http}/v2/models/vlm/config", timeout=10).json()
    context = int(config["parameters"]["max_model_len"]["string_value"])
    before = [vit_executions(server) for server in vit_servers]
    url = media_server.add("pool-long.mp4", mp4_bytes(frames=10))  # not in the LLM host's cache
    with pytest.raises(openai.BadRequestError, match="tokens of the context"):
        openai_client(llm_host).chat.completions.create(
            model="tiny-qwen2-vl", max_tokens=context - 4, messages=[{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}]}])
    assert [vit_executions(server) for server in vit_servers] == before


def test_an_llm_host_that_is_one_of_its_vit_servers(tiny_checkpoint, tmp_path, vit_servers, stack, media_server):
    """`local` in the list: the host's own `encode` model takes its share beside a ViT server."""
    remote = vit_servers[0].triton.grpc_url
    with running_stack(tiny_checkpoint, tmp_path, vit_endpoints=f"local,{remote}") as host:
        assert sorted(p.name for p in host.triton.model_repository.iterdir()) == [
            "encode", "preprocess", "vit", "vit_cache", "vlm"]
        content = [{"type": "text", "text": "Compare."},
                   image(media_server.add("mixed-a.png", png_bytes(84, 84, seed=311))),
                   image(media_server.add("mixed-b.png", png_bytes(56, 112, seed=312)))]
        assert answer(host, content) == answer(stack, content)
        time.sleep(1)
        assert calls(host, "local") == 1 and calls(host, remote) == 1


class ImageTraffic:
    """Threads sending image chats (a new image each) to the LLM host until stopped; results by status."""

    def __init__(self, stack, media_server, threads: int = 3) -> None:
        self.stack, self.media_server = stack, media_server
        self.statuses: list[int | str] = []
        self._stop = threading.Event()
        self._count = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> ImageTraffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._count += 1
                n = self._count
            url = self.media_server.add(f"traffic-{n}.png", png_bytes(56 + 28 * (n % 3), 56, seed=1000 + n))
            try:
                answer(self.stack, [{"type": "text", "text": "Describe."}, image(url)])
                self.statuses.append(200)
            except openai.APIStatusError as exc:
                self.statuses.append(exc.status_code)
            except Exception as exc:  # a transport failure: counted, never expected
                self.statuses.append(repr(exc))


def wait_until(condition, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.2)
    return time.monotonic()


def ready(server) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{server.triton.ports.http}/v2/models/encode/ready",
                         timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_killed_vit_server_costs_no_request_and_gets_calls_again_once_back(llm_host, vit_servers, media_server):
    victim, survivor = vit_servers
    with ImageTraffic(llm_host, media_server) as traffic:
        wait_until(lambda: len(traffic.statuses) >= 3, 120)
        os.kill(victim.triton.process.pid, signal.SIGKILL)  # its supervisor starts it again
        wait_until(lambda: not ready(victim), 10)
        served = len(traffic.statuses)
        back = wait_until(lambda: ready(victim), 120)
        before = calls(llm_host, victim.triton.grpc_url)
        again = wait_until(lambda: calls(llm_host, victim.triton.grpc_url) > before, 30)
        wait_until(lambda: len(traffic.statuses) >= served + 3, 120)
    assert again - back < 10, f"the restarted server got calls {again - back:.1f} s after it was ready"
    assert set(traffic.statuses) == {200}, traffic.statuses


def test_with_no_vit_server_images_get_503_text_still_works_and_images_come_back(llm_host, vit_servers,
                                                                                 media_server):
    for server in vit_servers:
        server.stop()
    try:
        url = media_server.add("pool-down.png", png_bytes(56, 56, seed=401))
        with pytest.raises(openai.APIStatusError) as raised:
            answer(llm_host, [{"type": "text", "text": "Describe."}, image(url)])
        assert raised.value.status_code == 503 and raised.value.response.headers.get("retry-after")
        assert "no ViT server can encode" in raised.value.response.json()["error"]["message"]
        assert answer(llm_host, [{"type": "text", "text": "Hello"}])
    finally:
        vit_servers.replace(1)
    url = media_server.add("pool-back.png", png_bytes(56, 84, seed=402))
    deadline = time.monotonic() + 30
    while True:  # back within the health check's interval of the server's readiness
        try:
            assert answer(llm_host, [{"type": "text", "text": "Describe."}, image(url)])
            break
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and time.monotonic() < deadline
            time.sleep(0.5)
    vit_servers.replace(0)
