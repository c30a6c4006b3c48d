"""How images and videos are turned into ViT inputs in one deployment, and the cache key that follows.

The `preprocess` model applies these settings and the `vlm` model keys the ViT embedding cache on
them, so both resolve them the same way: the checkpoint's processor values, overridden by the
model parameters the repository generator wrote (the same ones into both configs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from vlmserve.errors import InvalidRequest

# The exported ViT attends over all patches of a call at once (an N x N score matrix per head), so
# one image is capped at this many patches unless the deployment asks for more (max_pixels).
MAX_PATCHES_PER_IMAGE = 16384
# Decoded-size guard of the preprocess model, checked on the header before any pixel is decoded.
DECODE_PIXEL_LIMIT = 64_000_000
DEFAULT_VIDEO_FPS = 2.0  # qwen-vl-utils' default sampling rate
MAX_VIDEO_FPS = 60.0


def capped_max_pixels(max_pixels: int, patch_size: int) -> int:
    """``max_pixels`` lowered so a single image has at most MAX_PATCHES_PER_IMAGE patches."""
    return min(int(max_pixels), MAX_PATCHES_PER_IMAGE * patch_size**2)


@dataclass(frozen=True)
class MediaSettings:
    """Resize and sampling limits; every field is also a model parameter of the same name."""

    min_pixels: int
    max_pixels: int
    video_min_pixels: int
    video_max_pixels: int
    video_total_pixels: int
    max_frames: int
    video_fps: float = DEFAULT_VIDEO_FPS  # when a request names no fps
    max_image_pixels: int = DECODE_PIXEL_LIMIT

    def with_parameters(self, params: Mapping[str, str]) -> MediaSettings:
        """These settings with the fields named in ``params`` (model parameters, strings) replaced."""
        changes = {f.name: type(getattr(self, f.name))(params[f.name])
                   for f in dataclasses.fields(self) if f.name in params}
        return dataclasses.replace(self, **changes)

    def parameters(self) -> dict[str, str]:
        return {name: str(value) for name, value in dataclasses.asdict(self).items()}

    def fps_for(self, requested: object) -> float:
        """The sampling rate for a video part's ``fps`` (None: the default); InvalidRequest when unusable."""
        if requested is None:
            return self.video_fps
        try:
            fps = float(requested)
        except (TypeError, ValueError):
            raise InvalidRequest(f"video fps must be a number, got {requested!r}") from None
        if not 0 < fps <= MAX_VIDEO_FPS:
            raise InvalidRequest(f"video fps must be in (0, {MAX_VIDEO_FPS:g}], got {fps}")
        return fps

    def cache_key(self, data: bytes, kind: str, fps: float | None) -> str:
        """Identifies the ViT output for these media bytes: content hash plus everything that shapes the input."""
        header = json.dumps([kind, fps, dataclasses.asdict(self)], sort_keys=True).encode()
        digest = hashlib.sha256(header)
        digest.update(b"\0")
        digest.update(data)
        return digest.hexdigest()
