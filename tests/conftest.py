"""Shared fixtures: the small checkpoint, a local media HTTP server, and the running stack."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.tiny_model import build_tiny_checkpoint
from perf.media_server import MediaServer
from vlmserve.processes import free_port


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny-qwen2-vl")


@pytest.fixture(scope="session")
def media_server(tmp_path_factory):
    """Files on 127.0.0.1, standing in for remote image/video URLs."""
    with MediaServer(tmp_path_factory.mktemp("media")) as server:
        yield server


@pytest.fixture(scope="session")
def stack(tiny_checkpoint, tmp_path_factory):
    """tritonserver (all four models) + the OpenAI proxy, on free loopback ports."""
    from vlmserve.deployment import Stack, prepare_cpu_repository
    from vlmserve.triton_server import TritonPorts

    workdir = tmp_path_factory.mktemp("deploy")
    # One torch thread: OpenMP overhead dominates a model this small on a 2-core machine.
    repository = prepare_cpu_repository(tiny_checkpoint, workdir, llm_threads=1)
    # The media server is on loopback, which the proxy refuses to fetch from unless told otherwise.
    running = Stack.create(repository, workdir, "tiny-qwen2-vl", TritonPorts.free(),
                           free_port(), proxy_args=["--allow-media-network", "127.0.0.0/8"])
    running.start()
    yield running
    running.stop()
