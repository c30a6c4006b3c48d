"""What the proxy's tests without Triton share: a stand-in for Triton, request builders and checks."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
import urllib.parse

from fastapi.testclient import TestClient

from client.triton_vlm import GenerationChunk
from openai_proxy.app import create_app
from openai_proxy.routes import triton_client
from openai_proxy.settings import Settings
from vlmserve.vlm_settings import VlmSettings

MODEL = "test-model"
VLM_SETTINGS = VlmSettings(checkpoint_dir="/nowhere", served_model_name=MODEL)  # what Triton would report
SETTINGS = Settings(triton_url="127.0.0.1:1")  # no Triton there
ANSWER = [GenerationChunk("Hel", None, 5, 1), GenerationChunk("lo", None, 5, 2), GenerationChunk("", "stop", 5, 3)]


class FakeTriton:
    """Streams fixed chunks (the first after `first_delay_s`, default `delay_s`; each other after `delay_s`),
    then raises `error` if one is given.

    `calls` records what was asked; `closed` counts generations that ended, however they ended.
    """

    def __init__(self, chunks: list[GenerationChunk], error: Exception | None = None, delay_s: float = 0,
                 ready: bool = True, first_delay_s: float | None = None) -> None:
        self.chunks, self.error, self.delay_s, self.ready = chunks, error, delay_s, ready
        self.first_delay_s = first_delay_s
        self.calls: list[tuple] = []
        self.closed = 0

    async def is_ready(self) -> bool:
        return self.ready

    async def settings(self) -> VlmSettings:
        return VLM_SETTINGS

    async def generate(self, messages, media, sampling, request_id):
        self.calls.append((messages, media, sampling, request_id))
        async for chunk in self._chunks():
            yield chunk

    async def generate_text(self, prompt, sampling, request_id):
        self.calls.append((prompt, sampling, request_id))
        async for chunk in self._chunks():
            yield chunk

    async def _chunks(self):
        try:
            for index, chunk in enumerate(self.chunks):
                first = index == 0 and self.first_delay_s is not None
                await asyncio.sleep(self.first_delay_s if first else self.delay_s)
                yield chunk
            if self.error is not None:
                raise self.error
        finally:
            self.closed += 1


def client_with(fake: FakeTriton, settings: Settings = SETTINGS) -> TestClient:
    app = create_app(settings)
    app.dependency_overrides[triton_client] = lambda: fake
    return TestClient(app)


def user(content) -> dict:
    return {"role": "user", "content": content}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def assert_openai_error(response, status: int, message_part: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message_part in error["message"] and error["param"] == param, error
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")


def sse_payloads(response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


class TrickyMediaServer:
    """A loopback HTTP server for media-fetching tests that records every request it gets.

    /file/NAME serves what `add` stored, /redirect?to=URL answers 302 to URL, /loop redirects to
    itself, /slow answers after `slow_s`, /endless streams zeros without a Content-Length.
    """

    def __init__(self, slow_s: float = 3.0) -> None:
        self.files: dict[str, bytes] = {}
        self.seen: list[tuple[str, str]] = []  # (path, Host header)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server.seen.append((self.path, self.headers.get("Host", "")))
                url = urllib.parse.urlsplit(self.path)
                if url.path.startswith("/file/") and url.path[6:] in server.files:
                    self._send(200, server.files[url.path[6:]])
                elif url.path in ("/redirect", "/loop"):
                    self.send_response(302)
                    self.send_header("Location", urllib.parse.parse_qs(url.query)["to"][0] if url.query else "/loop")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif url.path == "/slow":
                    time.sleep(slow_s)
                    self._send(200, b"late")
                elif url.path == "/endless":
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for _ in range(10_000):
                        self.wfile.write(b"\0" * 65536)
                else:
                    self._send(404, b"no such file")

            def handle(self) -> None:
                try:
                    super().handle()
                except OSError:  # the client hung up (a size or time limit hit): what the tests want
                    pass

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_port
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def add(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return self.url(f"/file/{name}")

    def __enter__(self) -> TrickyMediaServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
