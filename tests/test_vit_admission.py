"""Admission before ViT work, and the `vit` process's memory on the largest image the settings allow.

A 4000x3000 photo is resized to the served max_pixels (16384 patches, about 4000 LLM tokens): with
max_tokens 512 it does not fit the tiny checkpoint's 4096-token context, and must be a 400 that names
both numbers before any `vit` call; with a context that holds it, it is answered and
the `vit` process stays under the documented bound.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import running_stack
from tests.test_vit_service import vit_executions
from vlmserve.media.preprocessing import VisionPreprocessor
from vlmserve.vit.packing import CPU_MAX_PATCHES_PER_CALL, vit_memory_bound

pytestmark = pytest.mark.timeout(600)

MODEL = "tiny-qwen2-vl"
CONTEXT = 4096  # the tiny checkpoint's max_position_embeddings
LONG_CONTEXT = 16384


def jpeg_bytes(width: int, height: int) -> bytes:
    """A photo-sized JPEG of a few hundred KB (smooth gradients with a little noise)."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(0)
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    pixels = np.clip(pixels + rng.integers(-8, 8, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def big_photo_url(media_server) -> str:
    return media_server.add("admission-4000x3000.jpg", jpeg_bytes(4000, 3000))


def ask(stack, url: str, max_tokens: int | None) -> openai.types.chat.ChatCompletion:
    """A chat with the image; ``max_tokens`` None leaves the server's default (512, capped by the context)."""
    client = openai.OpenAI(base_url=stack.proxy.base_url, api_key="unused", max_retries=0, timeout=300)
    limit = {} if max_tokens is None else {"max_tokens": max_tokens}
    return client.chat.completions.create(model=MODEL, temperature=0, **limit, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What is this?"}]}])


def image_tokens(checkpoint: Path, width: int, height: int) -> int:
    preprocessor = VisionPreprocessor.from_pretrained(checkpoint)
    settings = preprocessor.media_settings()
    _, grid = preprocessor.image(Image.new("RGB", (width, height)), settings.min_pixels, settings.max_pixels)
    return preprocessor.num_vision_tokens(grid)


def test_a_photo_over_the_context_is_a_400_before_the_vit_runs(stack, big_photo_url, tiny_checkpoint):
    before = vit_executions(stack)
    with pytest.raises(openai.BadRequestError) as error:
        ask(stack, big_photo_url, 512)
    match = re.search(r"Input length \((\d+)\) plus max_tokens \(512\) exceeds model's maximum context length "
                      r"\((\d+)\)", str(error.value))
    assert match, str(error.value)
    assert int(match[2]) == CONTEXT
    assert int(match[1]) > image_tokens(tiny_checkpoint, 4000, 3000) > CONTEXT - 512
    assert vit_executions(stack) == before


def test_max_tokens_past_the_context_is_a_400_before_the_vit_runs(stack, media_server):
    url = media_server.add("admission-small.jpg", jpeg_bytes(280, 280))
    before = vit_executions(stack)
    with pytest.raises(openai.BadRequestError, match=r"Input length \(\d+\) plus max_tokens \(4090\) exceeds "
                                                     rf"model's maximum context length \({CONTEXT}\)"):
        ask(stack, url, 4090)
    assert vit_executions(stack) == before
    assert ask(stack, url, 2).choices[0].message.content is not None  # fits once max_tokens does


@pytest.fixture(scope="module")
def long_context_stack(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a context that holds the 4000x3000 photo."""
    checkpoint = tmp_path_factory.mktemp("long-context") / "tiny-qwen2-vl"
    shutil.copytree(tiny_checkpoint, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = LONG_CONTEXT
    (checkpoint / "config.json").write_text(json.dumps(config))
    with running_stack(checkpoint, tmp_path_factory.mktemp("deploy-long-context")) as running:
        yield running


def vit_process_peak_rss(stack) -> int:
    """VmHWM of the Python backend stub that runs the `vit` model (a child of tritonserver)."""
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or "/vit/1/model.py" not in (proc / "cmdline").read_text():
                continue
            status = (proc / "status").read_text()
        except OSError:  # gone meanwhile
            continue
        parent = int(re.search(r"^PPid:\s+(\d+)", status, re.MULTILINE)[1])
        if parent == stack.triton.process.pid:
            return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)[1]) * 1024
    raise AssertionError("no vit stub process under this tritonserver")


def test_the_largest_photo_is_answered_within_the_vit_memory_bound(long_context_stack, big_photo_url,
                                                                   tiny_checkpoint):
    reply = ask(long_context_stack, big_photo_url, None)
    assert reply.usage.prompt_tokens > image_tokens(tiny_checkpoint, 4000, 3000) > CONTEXT - 512
    preprocessor = VisionPreprocessor.from_pretrained(tiny_checkpoint)
    config = json.loads((tiny_checkpoint / "config.json").read_text())["vision_config"]
    largest_image = preprocessor.media_settings().max_pixels // preprocessor.patch_size**2
    weights = (tiny_checkpoint / "model.safetensors").stat().st_size  # an upper bound of the tower's share
    bound = vit_memory_bound(max(largest_image, CPU_MAX_PATCHES_PER_CALL),
                             3 * preprocessor.temporal_patch_size * preprocessor.patch_size**2,
                             config["embed_dim"], weights)
    peak = vit_process_peak_rss(long_context_stack)
    print(f"vit peak RSS {peak / 2**20:.0f} MiB, documented bound {bound / 2**20:.0f} MiB")
    assert peak < bound
