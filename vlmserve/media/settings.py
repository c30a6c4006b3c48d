"""How images and videos are turned into ViT inputs in one deployment, and the cache key that follows.

The `preprocess` model applies these settings and the `vlm` model keys the ViT embedding cache on
them, so both resolve them the same way: the checkpoint's processor values, overridden by the
model parameters the repository generator wrote (the same ones into both configs). An image or
video part may ask for less or other (min/max_pixels, detail, fps, max_frames): `resolve` clamps
that into these limits, and the result is part of the cache key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vlmserve.errors import InvalidRequest
from vlmserve.model_parameters import ModelParameters

# One image is capped at this many patches unless the deployment asks for more (max_pixels): attention
# time grows with the square of a frame's patches, the ViT's memory linearly
# (vlmserve.vit.packing.vit_memory_bound), and the TensorRT graph's masked attention with the square.
MAX_PATCHES_PER_IMAGE = 16384
# Decoded-size guard of the preprocess model, checked on the header before any pixel is decoded.
DECODE_PIXEL_LIMIT = 64_000_000
# Sampled video frames are held at their source size until they are resized, so their total is
# bounded before decoding: the most frames (768) of a 720p video, 2 GiB of RGB.
DECODE_VIDEO_PIXEL_LIMIT = 768 * 1280 * 720
DEFAULT_VIDEO_FPS = 2.0  # the video processor's (and qwen-vl-utils') default sampling rate
MAX_VIDEO_FPS = 60.0
# An image part with `detail: "low"` and no max_pixels gets at most 256 visual tokens (28 x 28 pixels
# each on Qwen2-VL): about 448x448, close to the 512x512 OpenAI scales low-detail images to, and like
# OpenAI's low detail a small fixed ceiling on what one image costs.
LOW_DETAIL_MAX_PIXELS = 256 * 28 * 28
DETAILS = ("auto", "low", "high", "original")
# Frames are encoded in pairs (the ViT's temporal patch size), so fewer than two make no input.
MIN_FRAMES = 2
# transformers' Qwen2VLVideoProcessor defaults: sampled frame counts are multiples of
# FRAME_FACTOR (the ViT's temporal patch size) and clamped to [FPS_MIN_FRAMES, FPS_MAX_FRAMES].
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
# The processor's own defaults where a checkpoint sets nothing: Qwen2VLImageProcessor's for images,
# qwen-vl-utils' for video frames (per frame, and the whole video's budget).
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 56 * 56, 28 * 28 * 1280
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 24576 * 28 * 28
PATCH_SIZE = 14


def capped_max_pixels(max_pixels: int, patch_size: int) -> int:
    """``max_pixels`` lowered so a single image has at most MAX_PATCHES_PER_IMAGE patches."""
    return min(int(max_pixels), MAX_PATCHES_PER_IMAGE * patch_size**2)


@dataclass(frozen=True)
class MediaSettings(ModelParameters):
    """Resize and sampling limits; every field is also a model parameter of the same name."""

    min_pixels: int
    max_pixels: int
    video_min_pixels: int
    video_max_pixels: int
    video_total_pixels: int
    max_frames: int
    video_fps: float = DEFAULT_VIDEO_FPS  # when a request names no fps
    max_image_pixels: int = DECODE_PIXEL_LIMIT
    max_video_pixels: int = DECODE_VIDEO_PIXEL_LIMIT  # sampled frames x source frame pixels
    low_detail_max_pixels: int = LOW_DETAIL_MAX_PIXELS

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> MediaSettings:
        """A checkpoint's limits as served: `preprocessor_config.json` (top-level min/max_pixels win over
        `size`, as in HF) and `video_preprocessor_config.json` if there is one; max_pixels capped for the
        ViT (MAX_PATCHES_PER_IMAGE)."""
        image = _read_json(Path(checkpoint_dir) / "preprocessor_config.json")
        video = _read_json(Path(checkpoint_dir) / "video_preprocessor_config.json")
        size, video_size = image.get("size") or {}, video.get("size") or {}
        patch_size = image.get("patch_size", PATCH_SIZE)

        def first(*values: int | None) -> int:
            return next(value for value in values if value is not None)

        return cls(
            min_pixels=first(image.get("min_pixels"), size.get("shortest_edge"), IMAGE_MIN_PIXELS),
            max_pixels=capped_max_pixels(first(image.get("max_pixels"), size.get("longest_edge"), IMAGE_MAX_PIXELS),
                                         patch_size),
            video_min_pixels=first(video.get("min_pixels"), video_size.get("shortest_edge"),
                                   video_size.get("min_pixels"), VIDEO_MIN_PIXELS),
            video_max_pixels=capped_max_pixels(first(video.get("max_pixels"), video_size.get("longest_edge"),
                                                     video_size.get("max_pixels"), VIDEO_MAX_PIXELS), patch_size),
            video_total_pixels=VIDEO_TOTAL_PIXELS,
            max_frames=FPS_MAX_FRAMES,
        )

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

    def frames_for(self, requested: object) -> int:
        """A video part's ``max_frames`` (None: the server's), at most the server's max_frames."""
        frames = _count("max_frames", requested)
        if frames is None:
            return self.max_frames
        if frames < MIN_FRAMES:
            raise InvalidRequest(f"max_frames must be at least {MIN_FRAMES} (frames are encoded in pairs), "
                                 f"got {frames}")
        return min(frames, self.max_frames)

    def pixels_for(self, min_pixels: object, max_pixels: object, detail: object = None) -> tuple[int, int]:
        """An image part's (min_pixels, max_pixels): the request's, each clamped into the server's range.

        ``detail`` "low" stands for ``low_detail_max_pixels`` when the part sets no max_pixels; a part
        whose min_pixels exceeds its max_pixels is an InvalidRequest.
        """
        low, high = _count("min_pixels", min_pixels), _count("max_pixels", max_pixels)
        if detail is not None and detail not in DETAILS:
            raise InvalidRequest(f"detail must be one of {', '.join(DETAILS)}, got {detail!r}")
        if high is None and detail == "low":
            high = self.low_detail_max_pixels
        if low is not None and high is not None and low > high:
            raise InvalidRequest(f"min_pixels ({low}) exceeds max_pixels ({high})")

        def clamp(value: int | None, default: int) -> int:
            return min(max(default if value is None else value, self.min_pixels), self.max_pixels)

        return clamp(low, self.min_pixels), clamp(high, self.max_pixels)

    def resolve(self, part: Mapping[str, object]) -> MediumOptions:
        """What an image/video part (of the `vlm` model's messages) asks for, within these settings."""
        kind = part.get("type")
        if kind == "image":
            min_pixels, max_pixels = self.pixels_for(part.get("min_pixels"), part.get("max_pixels"), part.get("detail"))
            return MediumOptions(kind, min_pixels=min_pixels, max_pixels=max_pixels)
        if kind == "video":
            return MediumOptions(kind, fps=self.fps_for(part.get("fps")),
                                 max_frames=self.frames_for(part.get("max_frames")))
        raise InvalidRequest(f"unknown media kind {kind!r}")

    def cache_key(self, data: bytes, options: MediumOptions) -> str:
        """Identifies the ViT output for these media bytes: content hash plus everything that shapes the input."""
        header = json.dumps([dataclasses.asdict(options), dataclasses.asdict(self)], sort_keys=True).encode()
        digest = hashlib.sha256(header)
        digest.update(b"\0")
        digest.update(data)
        return digest.hexdigest()


@dataclass(frozen=True)
class MediumOptions:
    """One image or video part's own settings, resolved against the server's (None: not for this kind)."""

    kind: str
    fps: float | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_frames: int | None = None


def _count(name: str, value: object) -> int | None:
    """A positive whole number a request set (None when unset); InvalidRequest otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"{name} must be a positive integer, got {value!r}")
    return value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
