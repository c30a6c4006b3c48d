"""Shared fixtures: the small checkpoint, a local media HTTP server, and the running stack."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
from pathlib import Path

import pytest

from export.tiny_model import build_tiny_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny-qwen2-vl")


class MediaServer:
    """Serves files from a directory on 127.0.0.1, standing in for remote image/video URLs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return f"http://127.0.0.1:{self.httpd.server_port}/{name}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="session")
def media_server(tmp_path_factory):
    server = MediaServer(tmp_path_factory.mktemp("media"))
    server.thread.start()
    yield server
    server.httpd.shutdown()


@pytest.fixture(scope="session")
def stack(tiny_checkpoint, tmp_path_factory):
    """tritonserver (all four models) + the OpenAI proxy, on free loopback ports."""
    from vlmserve.deployment import Stack, prepare_cpu_repository
    from vlmserve.triton_server import TritonPorts

    workdir = tmp_path_factory.mktemp("deploy")
    # One torch thread: OpenMP overhead dominates a model this small on a 2-core machine.
    repository = prepare_cpu_repository(tiny_checkpoint, workdir, llm_threads=1)
    # The media server is on loopback, which the proxy refuses to fetch from unless told otherwise.
    running = Stack.create(repository, workdir, "tiny-qwen2-vl", TritonPorts(free_port(), free_port(), free_port()),
                           free_port(), proxy_args=["--allow-media-network", "127.0.0.0/8"])
    running.start()
    yield running
    running.stop()
