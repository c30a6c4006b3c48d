"""The ViT embedding cache's policy and keys, without Triton (the served cache: test_vit_service.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vlmserve.errors import InvalidRequest
from vlmserve.media.settings import MAX_PATCHES_PER_IMAGE, MediaSettings
from vlmserve.media.preprocessing import VisionPreprocessor
from vlmserve.media.settings import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS
from vlmserve.vit.cache import EmbeddingCache

GRID = np.array([1, 4, 4])


def embeds(tokens: int, value: float = 1.0) -> np.ndarray:
    return np.full((tokens, 8), value, np.float32)


def entry_bytes(tokens: int) -> int:
    return tokens * 8 * 4 + GRID.astype(np.int64).nbytes


def test_hit_miss_and_copy():
    cache = EmbeddingCache(max_bytes=10_000)
    assert cache.get("a") is None
    source = embeds(4)
    assert cache.put("a", source, GRID)
    source[:] = 7  # the caller's buffer is reused by Triton: the cache must hold its own copy
    entry = cache.get("a")
    assert entry is not None and (entry.embeds == 1).all() and entry.grid_thw.tolist() == [1, 4, 4]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.entries) == (1, 1, 1)
    assert cache.stats.bytes == entry_bytes(4)


def test_evicts_least_recently_used_within_the_byte_budget():
    cache = EmbeddingCache(max_bytes=2 * entry_bytes(4) + 10)  # room for two entries
    cache.put("a", embeds(4), GRID)
    cache.put("b", embeds(4), GRID)
    cache.get("a")  # now "b" is the least recently used
    cache.put("c", embeds(4), GRID)
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.stats.evictions == 1 and cache.stats.entries == 2
    assert cache.stats.bytes == 2 * entry_bytes(4) <= cache.max_bytes
    cache.put("big", embeds(8), GRID)  # needs both slots
    assert cache.stats.evictions == 3 and cache.stats.entries == 1


def test_too_large_is_not_stored_and_evicts_nothing():
    cache = EmbeddingCache(max_bytes=entry_bytes(4))
    cache.put("a", embeds(4), GRID)
    assert not cache.put("huge", embeds(100), GRID)
    assert cache.get("a") is not None and cache.stats.evictions == 0


def test_storing_a_key_again_replaces_it():
    cache = EmbeddingCache(max_bytes=10_000)
    cache.put("a", embeds(4, 1.0), GRID)
    cache.put("a", embeds(4, 2.0), GRID)
    assert cache.stats.entries == 1 and cache.stats.bytes == entry_bytes(4)
    assert (cache.get("a").embeds == 2).all()


@pytest.fixture(scope="module")
def settings(tiny_checkpoint) -> MediaSettings:
    return VisionPreprocessor.from_pretrained(tiny_checkpoint).media_settings()


def test_checkpoint_settings_cap_images_for_the_vit(settings):
    # Qwen2-VL-2B's max_pixels (28*28*16384) would allow 65536 patches per image.
    assert settings.max_pixels == MAX_PATCHES_PER_IMAGE * 14 * 14 == 3_211_264
    assert settings.min_pixels == 3136
    assert (settings.video_min_pixels, settings.video_max_pixels) == (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)
    assert settings.max_frames == 768 and settings.video_fps == 2.0


def test_parameters_override_settings(settings):
    changed = settings.with_parameters({"max_frames": "64", "video_fps": "1.5", "checkpoint_dir": "/x"})
    assert (changed.max_frames, changed.video_fps) == (64, 1.5)
    assert changed.with_parameters(settings.parameters()) == settings


def test_cache_key_covers_bytes_the_part_s_options_and_settings(settings):
    image = settings.resolve({"type": "image"})
    key = settings.cache_key(b"image bytes", image)
    assert key == settings.cache_key(b"image bytes", settings.resolve({"type": "image"}))
    others = {
        settings.cache_key(b"image bytez", image),
        settings.cache_key(b"image bytes", settings.resolve({"type": "video", "fps": 2.0})),
        settings.cache_key(b"image bytes", settings.resolve({"type": "video", "fps": 1.0})),
        settings.cache_key(b"image bytes", settings.resolve({"type": "video", "fps": 2.0, "max_frames": 8})),
        settings.cache_key(b"image bytes", settings.resolve({"type": "image", "max_pixels": 200704})),
        settings.cache_key(b"image bytes", settings.resolve({"type": "image", "min_pixels": 200704})),
        dataclasses.replace(settings, max_pixels=settings.max_pixels // 2).cache_key(b"image bytes", image),
    }
    assert key not in others and len(others) == 7
    # What the ViT sees is the same, so the entry is too: a value over the server's limit is the limit.
    over = settings.resolve({"type": "image", "max_pixels": settings.max_pixels * 4})
    assert settings.cache_key(b"image bytes", over) == key


def test_fps_for(settings):
    assert settings.fps_for(None) == 2.0 and settings.fps_for("0.5") == 0.5
    for bad in (0, -1, 61, "fast", [2]):
        with pytest.raises(InvalidRequest, match="fps"):
            settings.fps_for(bad)
