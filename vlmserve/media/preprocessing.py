"""Turning decoded images and video frames into Qwen2-VL vision-tower inputs.

Images go through transformers' ``Qwen2VLImageProcessorPil`` itself (it needs
no torchvision), so they match the HF processor exactly. Videos reuse its
bicubic resize, rescale and normalize; the per-frame pixel budget is the one
qwen-vl-utils computes, and the temporal patch layout is a numpy port of
``Qwen2VLVideoProcessor.patchify`` (whose module needs torchvision).
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from vlmserve.media.decode import MediaError
from vlmserve.media.settings import FRAME_FACTOR, MediaSettings

T = TypeVar("T")


class VisionPreprocessor:
    """Pixel values and ``grid_thw`` for images and videos of one checkpoint, within its media settings."""

    def __init__(self, image_processor: Qwen2VLImageProcessorPil, settings: MediaSettings) -> None:
        self._processor = image_processor
        self._settings = settings

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> VisionPreprocessor:
        """The checkpoint's processor, with its limits as served (MediaSettings.from_checkpoint)."""
        return cls(Qwen2VLImageProcessorPil.from_pretrained(str(checkpoint_dir)),
                   MediaSettings.from_checkpoint(checkpoint_dir))

    def with_settings(self, settings: MediaSettings) -> VisionPreprocessor:
        """The same image processor with other limits (a deployment's overrides)."""
        return VisionPreprocessor(self._processor, settings)

    def media_settings(self) -> MediaSettings:
        return self._settings

    @property
    def patch_size(self) -> int:
        return self._processor.patch_size

    @property
    def temporal_patch_size(self) -> int:
        return self._processor.temporal_patch_size

    @property
    def merge_size(self) -> int:
        return self._processor.merge_size

    def image(
        self, img: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """float32 pixel_values [grid_t*grid_h*grid_w, C*T*P*P] and int64 grid_thw [3]."""
        size = self._processor.size
        min_pixels = _first_set(min_pixels, size.shortest_edge)
        max_pixels = _first_set(max_pixels, size.longest_edge)
        self._target_size(img.height, img.width, min_pixels, max_pixels)  # rejects bad aspect ratios as MediaError
        out = self._processor.preprocess(
            [img], size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, return_tensors=None
        )
        return out["pixel_values"], out["image_grid_thw"][0]

    def image_grid(self, height: int, width: int, min_pixels: int, max_pixels: int) -> np.ndarray:
        """int64 grid_thw [3] of an image of this size, as `image` gives it, without its pixels."""
        resized_height, resized_width = self._target_size(height, width, min_pixels, max_pixels)
        return np.array([1, resized_height // self.patch_size, resized_width // self.patch_size], dtype=np.int64)

    def video(
        self,
        frames: np.ndarray,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        total_pixels: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """float32 pixel_values [grid_t*grid_h*grid_w, C*T*P*P] and int64 grid_thw [3].

        ``frames`` is uint8 [T, H, W, 3] RGB, already sampled (``media.decode_video``).
        """
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
            raise ValueError(f"frames must be non-empty uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
        nframes, height, width, _ = frames.shape
        limits = self._settings
        min_pixels = _first_set(min_pixels, limits.video_min_pixels)
        total_pixels = _first_set(total_pixels, limits.video_total_pixels)
        if max_pixels is None:
            # qwen-vl-utils fetch_video: an even share of the total budget per frame pair,
            # capped per frame and floored just above min_pixels; an explicit max_pixels wins.
            max_pixels = max(min(limits.video_max_pixels, total_pixels / nframes * FRAME_FACTOR),
                             int(min_pixels * 1.05))
        resized_height, resized_width = self._target_size(height, width, min_pixels, max_pixels)
        video = np.stack([self._frame_to_chw(frame, resized_height, resized_width) for frame in frames])
        patches, grid_t, grid_h, grid_w = patchify_video(
            video, self.patch_size, self.merge_size, self.temporal_patch_size
        )
        return patches, np.array([grid_t, grid_h, grid_w], dtype=np.int64)

    def num_vision_tokens(self, grid_thw: np.ndarray) -> int:
        """LLM tokens the vision tower emits for ``grid_thw`` ([3] or [N, 3], summed)."""
        grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
        return int(grid.prod(axis=1).sum()) // self.merge_size**2

    def _target_size(self, height: int, width: int, min_pixels: float, max_pixels: float) -> tuple[int, int]:
        try:
            return smart_resize(
                height, width, factor=self.patch_size * self.merge_size, min_pixels=min_pixels, max_pixels=max_pixels
            )
        except ValueError as exc:  # extreme aspect ratio
            raise MediaError(f"cannot resize a {width}x{height} image: {exc}") from None

    def _frame_to_chw(self, frame: np.ndarray, height: int, width: int) -> np.ndarray:
        """[H, W, 3] uint8 -> [3, height, width] float32, step for step like the image path.

        PIL bicubic resize, then the image processor's own rescale/normalize (float64 multiply,
        float32 normalize), so a frame's pixels equal those of the same picture sent as an image.
        Working frame by frame keeps the float64 intermediate one frame large.
        """
        resized = Image.fromarray(frame).resize((width, height), self._processor.resample)
        chw = np.asarray(resized).transpose(2, 0, 1)
        if self._processor.do_rescale:
            chw = self._processor.rescale(chw, self._processor.rescale_factor)
        if self._processor.do_normalize:
            chw = self._processor.normalize(chw, self._processor.image_mean, self._processor.image_std)
        return chw.astype(np.float32, copy=False)


def patchify_video(
    video: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[np.ndarray, int, int, int]:
    """[T, C, H, W] -> ([grid_t*grid_h*grid_w, C*temporal*P*P], grid_t, grid_h, grid_w).

    numpy port of ``Qwen2VLVideoProcessor.patchify`` (batch dimension dropped):
    rows go temporal group, merge block (row-major), patch within the block;
    each row is channel, frame within the group, patch pixel row, column.
    """
    if pad := -len(video) % temporal_patch_size:
        # HF pads by repeating the last frame.
        video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
    num_frames, channels, height, width = video.shape
    grid_t = num_frames // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = video.reshape(
        grid_t,
        temporal_patch_size,
        channels,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    # (grid_t, gh/m, gw/m, m, m, C, temporal, P, P): HF's permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9) minus batch.
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return flat, grid_t, grid_h, grid_w


def _first_set(*values: T | None) -> T:
    """The first value that is not None (0 is a legitimate setting)."""
    return next(value for value in values if value is not None)
