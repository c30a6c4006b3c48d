"""Shared fixtures: the small checkpoint, a local media HTTP server, and the running stack."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from export.tiny_model import build_tiny_checkpoint
from perf.media_server import MediaServer


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny-qwen2-vl")


@pytest.fixture(scope="session")
def media_server(tmp_path_factory):
    """Files on 127.0.0.1, standing in for remote image/video URLs."""
    with MediaServer(tmp_path_factory.mktemp("media")) as server:
        yield server


# What the engine runs with in tests: vLLM without torch.compile (starts in seconds), a small KV cache, and JSON
# without free whitespace (random weights love it: constrained answers would be all indentation).
ENGINE_OPTIONS = {"enforce_eager": True, "kv_cache_bytes": 256 * 2**20,
                  "llm_engine_args": {"structured_outputs_config": {"backend": "xgrammar",
                                                                    "disable_any_whitespace": True}}}


@contextlib.contextmanager
def running_stack(checkpoint: Path, workdir: Path, proxy_args: tuple[str, ...] = (), **options):
    """tritonserver (all models) + the OpenAI proxy on free loopback ports, stopped on exit."""
    from launcher.deployment import Stack, prepare_cpu_repository
    from launcher.triton_server import TritonPorts

    repository = prepare_cpu_repository(checkpoint, workdir, **{**ENGINE_OPTIONS, **options})
    # The media server is on loopback, which the proxy refuses to fetch from unless told otherwise.
    running = Stack.create(repository, workdir, TritonPorts.free(), 0,
                           proxy_args=["--allow-media-network", "127.0.0.0/8", *proxy_args])
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def stack(tiny_checkpoint, tmp_path_factory):
    """The whole stack on the small checkpoint, shared by the tests that only send requests."""
    with running_stack(tiny_checkpoint, tmp_path_factory.mktemp("deploy")) as running:
        yield running
