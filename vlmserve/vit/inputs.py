"""Inputs of the exported Qwen2-VL vision tower that depend on ``grid_thw``.

The HF vision tower derives rotary position ids and per-frame attention
segments from ``grid_thw`` with Python loops, which cannot live in an
ONNX/TensorRT graph. They are computed here, in preprocessing, and fed to the
graph as plain tensors. numpy only, so the Triton ``vit`` model and clients can
use it without torch.
"""

from __future__ import annotations

import numpy as np

from vlmserve.contracts import VIT


def _as_grid(grid_thw: np.ndarray) -> np.ndarray:
    grid = np.asarray(grid_thw, dtype=np.int64)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape [num_images, 3], got {grid.shape}")
    if (grid <= 0).any():
        raise ValueError(f"grid_thw entries must be positive, got {grid.tolist()}")
    return grid


def num_patches(grid_thw: np.ndarray) -> int:
    """Total patch rows of ``pixel_values`` for this grid (sum of t*h*w)."""
    return int(_as_grid(grid_thw).prod(axis=1).sum())


def vision_position_ids(grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    """(h, w) rotary ids per patch, int64 [num_patches, 2].

    Same order as ``transformers.vision_utils.get_vision_position_ids``: patches
    are laid out block-major over merge x merge blocks (the processor's patch
    order), and every temporal frame repeats the frame's ids.
    """
    m = spatial_merge_size
    per_image = []
    for t, h, w in _as_grid(grid_thw).tolist():
        if h % m or w % m:
            raise ValueError(f"grid h={h}, w={w} not divisible by spatial_merge_size={m}")
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = (h // m, m, w // m, m)
        hpos = hpos.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
        per_image.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
    return np.concatenate(per_image, axis=0).astype(np.int64)


def vision_segment_ids(grid_thw: np.ndarray) -> np.ndarray:
    """Attention segment of each patch, int64 [num_patches].

    HF's ``cu_seqlens`` makes every temporal frame of every image/video its own
    attention segment (``repeat_interleave(h*w, t)``), so segments are numbered
    frame by frame over the whole batch.
    """
    grid = _as_grid(grid_thw)
    frame_sizes = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    return np.repeat(np.arange(len(frame_sizes), dtype=np.int64), frame_sizes)


def vit_inputs(
    pixel_values: np.ndarray, grid_thw: np.ndarray, spatial_merge_size: int
) -> dict[str, np.ndarray]:
    """The exact input dict of the exported vision tower (ONNX or TensorRT)."""
    pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
    expected = num_patches(grid_thw)
    if pixels.ndim != 2 or pixels.shape[0] != expected:
        raise ValueError(
            f"pixel_values must be [{expected}, C*T*P*P] for grid_thw, got {pixels.shape}"
        )
    return {
        VIT.PIXEL_VALUES.name: pixels,
        VIT.POSITION_IDS.name: vision_position_ids(grid_thw, spatial_merge_size),
        VIT.SEGMENT_IDS.name: vision_segment_ids(grid_thw),
    }
