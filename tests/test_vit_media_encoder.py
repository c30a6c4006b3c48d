"""The `vlm` model's media path (vlmserve.media.encoder) against in-process stand-ins for its model calls.

`preprocess`, `vit` and `vit_cache` are replaced by the code they run (decode + processor, the
exported ONNX tower, EmbeddingCache), so dedupe, joining, the cache switch and error paths are
checked call by call, in milliseconds. The served versions: test_vit_service.py.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from export.vision_onnx import export_vision_onnx
from tests.test_end_to_end import png_bytes
from vlmserve.errors import InvalidRequest
from vlmserve.media.decode import decode_image
from vlmserve.media.encoder import MediaEncoder
from vlmserve.media.vision import LocalVision
from vlmserve.media.preprocessing import VisionPreprocessor
from vlmserve.vit.runner import OnnxVitRunner
from vlmserve.vit.cache import EmbeddingCache

IMAGE = {"type": "image"}


class FakeModels:
    """What the three models compute, keyed by model name, with a count of calls."""

    def __init__(self, checkpoint: Path, onnx_path: Path) -> None:
        self.preprocessor = VisionPreprocessor.from_pretrained(checkpoint)
        self.settings = self.preprocessor.media_settings()
        self.encoder = OnnxVitRunner(onnx_path, 1)
        self.cache = EmbeddingCache(2**20)
        self.calls: Counter[str] = Counter()

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """vlmserve.media.encoder.Infer, as a BLS call answers it."""
        await asyncio.sleep(0.01)  # a real round trip: lets concurrent requests overlap
        return {name: value for name, value in self.run(model, inputs).items() if name in outputs}

    def run(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls[model] += 1
        if model == "preprocess":
            image = decode_image(inputs["MEDIA"][0])
            pixels, grid = self.preprocessor.image(image, self.settings.min_pixels, self.settings.max_pixels)
            return {"PIXEL_VALUES": pixels, "GRID_THW": grid}
        if model == "vit":
            return {"image_embeds": self.encoder.run(inputs)}
        key = inputs["KEY"][0].decode()
        if "EMBEDS" in inputs:
            return {"FOUND": np.asarray([self.cache.put(key, inputs["EMBEDS"], inputs["GRID_THW"])])}
        entry = self.cache.get(key)
        if entry is None:
            return {"FOUND": np.asarray([False]), "EMBEDS": np.zeros((0, 0), np.float32),
                    "GRID_THW": np.zeros(3, np.int64)}
        return {"FOUND": np.asarray([True]), "EMBEDS": entry.embeds, "GRID_THW": entry.grid_thw}


@pytest.fixture(scope="module")
def onnx_path(tiny_checkpoint, tmp_path_factory) -> Path:
    return export_vision_onnx(tiny_checkpoint, tmp_path_factory.mktemp("vit") / "vit.onnx")


@pytest.fixture
def models(tiny_checkpoint, onnx_path) -> FakeModels:
    return FakeModels(tiny_checkpoint, onnx_path)


@pytest.fixture
def make_encoder(models):
    def make(use_cache: bool) -> MediaEncoder:
        vision = LocalVision(models.infer, models.preprocessor.merge_size, 4096)
        return MediaEncoder(vision, models.settings, models.infer if use_cache else None)

    return make


def test_duplicates_in_a_request_are_encoded_once_in_one_vit_call(make_encoder, models):
    a, b = png_bytes(84, 56, seed=1), png_bytes(56, 112, seed=2)
    encoded = asyncio.run(make_encoder(True).encode([IMAGE] * 3, [a, b, a]))
    assert models.calls == {"vit_cache": 4, "preprocess": 2, "vit": 1}  # 2 lookups, 2 stores
    assert np.array_equal(encoded[0].embeds, encoded[2].embeds)
    assert [e.grid_thw.tolist() for e in encoded] == [[1, 4, 6], [1, 8, 4], [1, 4, 6]]
    # The keys the llm's prefix cache matches media by: the same for the same bytes only.
    assert encoded[0].key == encoded[2].key != encoded[1].key


def test_cache_on_and_off_give_the_same_embeddings(make_encoder, models):
    media = [png_bytes(84, 56, seed=3), png_bytes(140, 98, seed=4)]
    on, off = make_encoder(True), make_encoder(False)
    first = asyncio.run(on.encode([IMAGE] * 2, media))
    models.calls.clear()
    again = asyncio.run(on.encode([IMAGE] * 2, media))
    assert models.calls == {"vit_cache": 2}  # two hits, nothing decoded or encoded
    uncached = asyncio.run(off.encode([IMAGE] * 2, media))
    assert models.calls == {"vit_cache": 2, "preprocess": 2, "vit": 1}
    for x, y, z in zip(first, again, uncached):
        assert x.key == y.key == z.key
        np.testing.assert_array_equal(x.embeds, y.embeds)
        np.testing.assert_array_equal(x.embeds, z.embeds)


def test_concurrent_requests_join_one_encoding(make_encoder, models):
    encoder, image = make_encoder(False), png_bytes(112, 112, seed=5)

    async def both():
        return await asyncio.gather(encoder.encode([IMAGE], [image]), encoder.encode([IMAGE], [image]))

    first, second = asyncio.run(both())
    assert models.calls == {"preprocess": 1, "vit": 1}
    np.testing.assert_array_equal(first[0].embeds, second[0].embeds)


def test_bad_media_fail_every_request_that_waits_for_them(make_encoder, models):
    encoder = make_encoder(True)

    async def both():
        return await asyncio.gather(encoder.encode([IMAGE], [b"not an image"]),
                                    encoder.encode([IMAGE], [b"not an image"]), return_exceptions=True)

    errors = asyncio.run(both())
    assert all(isinstance(e, InvalidRequest) and "not an image" in str(e) for e in errors)
    assert models.calls["preprocess"] == 1 and not encoder._running
    with pytest.raises(InvalidRequest, match="fps"):
        asyncio.run(encoder.encode([{"type": "video", "fps": 0}], [b"video"]))


def reject_all(grids: list[np.ndarray]) -> None:
    raise InvalidRequest(f"{len(grids)} grids: {[g.tolist() for g in grids]}")


def test_admission_sees_every_grid_before_any_vit_call(make_encoder, models):
    encoder = make_encoder(True)
    cached, new = png_bytes(84, 56, seed=6), png_bytes(56, 112, seed=7)
    asyncio.run(encoder.encode([IMAGE], [cached]))
    models.calls.clear()
    with pytest.raises(InvalidRequest, match=r"3 grids: \[\[1, 4, 6\], \[1, 8, 4\], \[1, 4, 6\]\]"):
        asyncio.run(encoder.encode([IMAGE] * 3, [cached, new, cached], admit=reject_all))
    assert models.calls == {"vit_cache": 2, "preprocess": 1}  # no vit call, nothing stored
    assert not encoder._running


def test_a_request_that_joined_a_rejected_one_still_gets_its_embeddings(make_encoder, models):
    encoder, image = make_encoder(False), png_bytes(112, 112, seed=8)

    async def both():
        return await asyncio.gather(encoder.encode([IMAGE], [image], admit=reject_all),
                                    encoder.encode([IMAGE], [image]), return_exceptions=True)

    rejected, joined = asyncio.run(both())
    assert isinstance(rejected, InvalidRequest)
    assert joined[0].grid_thw.tolist() == [1, 8, 8] and len(joined[0].embeds) == 16
    assert models.calls == {"preprocess": 2, "vit": 1}  # the joiner redid the rejected owner's work
    assert not encoder._running
