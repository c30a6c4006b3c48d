"""Shared by the ViT benchmarks: a stack started like tests/conftest.py's `stack`, and timed streams.

Requests go straight to the `vlm` model through client/triton_vlm.py (media as bytes), so the
figures leave out the proxy's media fetching.
"""

from __future__ import annotations

import io
import json
import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from client.triton_vlm import TritonVLMClient
from export.tiny_model import build_tiny_checkpoint
from launcher.deployment import Stack, prepare_cpu_repository
from launcher.triton_server import TritonPorts


def checkpoint_or_tiny(checkpoint: Path | None, workdir: Path) -> Path:
    if checkpoint is not None:
        return checkpoint
    tiny = workdir / "tiny-qwen2-vl"
    if not (tiny / "config.json").exists():
        build_tiny_checkpoint(tiny)
    return tiny


@contextmanager
def running_stack(checkpoint: Path, workdir: Path, **repository_options) -> Iterator[Stack]:
    """tritonserver + proxy on free loopback ports; `repository_options` go to the repository generator."""
    repository = prepare_cpu_repository(checkpoint, workdir, **repository_options)
    stack = Stack.create(repository, workdir, TritonPorts.free(), 0)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def noise_png(width: int, height: int, seed: int) -> bytes:
    """Random pixels: every seed is new content, so the ViT cache cannot answer it by accident."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def renamed_png(png: bytes, n: int) -> bytes:
    """The same picture with a tEXt chunk saying ``n``: new bytes (a cache miss), same decoding work.

    Costs microseconds, where encoding a new picture in the benchmark's event loop would delay
    the very stream being timed.
    """
    body = b"copy\0" + str(n).encode()
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    ihdr_end = 8 + 8 + 13 + 4  # signature, IHDR length+type, IHDR data, CRC
    return png[:ihdr_end] + chunk + png[ihdr_end:]


@dataclass
class TimedStream:
    text: str
    prompt_tokens: int
    ttft_s: float  # request sent -> first generated token
    token_times: list[tuple[float, int]]  # (seconds since the request, completion tokens so far) per chunk

    def per_token_s(self) -> float:
        """Mean time per generated token after the first one."""
        (t0, n0), (t1, n1) = self.token_times[0], self.token_times[-1]
        return (t1 - t0) / (n1 - n0)

    def longest_gap_s(self) -> float:
        """Longest wait between two chunks after the first: how long the stream ever stalled."""
        times = [t for t, _ in self.token_times]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)


async def timed_generate(client: TritonVLMClient, messages: list[dict], media: list[bytes],
                         sampling: dict) -> TimedStream:
    start = time.perf_counter()
    text, times, prompt_tokens = "", [], 0
    async for chunk in client.generate(messages, media, sampling, uuid.uuid4().hex):
        text += chunk.text
        prompt_tokens = chunk.prompt_tokens
        if chunk.completion_tokens and (not times or chunk.completion_tokens > times[-1][1]):
            times.append((time.perf_counter() - start, chunk.completion_tokens))
    if not times:
        raise RuntimeError("the stream produced no tokens")
    return TimedStream(text, prompt_tokens, times[0][0], times)


def report(result: dict, json_path: Path | None) -> None:
    """Print the figures one per line; also write them as JSON when asked."""
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:>{width}}: {value:.3f}" if isinstance(value, float) else f"{key:>{width}}: {value}")
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
