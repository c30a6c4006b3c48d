"""Qwen2-VL M-RoPE position ids for a prompt, computed by transformers' own code."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2VLConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values get_rope_index expects


class _RopeIndex:
    """Host for `Qwen2VLModel.get_rope_index` without building the model.

    The two methods read nothing from `self` but `self.config` and each other, so binding them
    to this small class runs the library code unchanged while skipping the weights a real
    `Qwen2VLModel` would allocate (a few GB for a real checkpoint, for an integer computation).
    """

    get_rope_index = Qwen2VLModel.get_rope_index
    get_vision_position_ids = Qwen2VLModel.get_vision_position_ids

    def __init__(self, config: Qwen2VLConfig) -> None:
        self.config = config


def _grid(grid_thw: np.ndarray | None) -> torch.Tensor | None:
    if grid_thw is None or np.size(grid_thw) == 0:
        return None
    return torch.from_numpy(np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3))


def _check_pad_counts(types: np.ndarray, kind: int, grid: torch.Tensor | None, merge: int, name: str) -> None:
    expected = 0 if grid is None else int(grid.prod(-1).sum()) // merge**2
    found = int((types == kind).sum())
    if found != expected:
        raise ValueError(f"prompt has {found} {name} pad tokens but the {name} grids need {expected}")


def mrope_positions(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    config: Qwen2VLConfig,
) -> tuple[np.ndarray, int]:
    """M-RoPE position ids int64 [3, L] of a prompt and its rope delta.

    Generated token i (0-based over the whole sequence, i >= L) has position i + delta on all
    three axes. Grids are [n, 3] (t, h, w) in patches, in prompt order.
    """
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError("input_ids is empty")
    types = np.full(ids.shape, TEXT, dtype=np.int32)
    types[ids == config.image_token_id] = IMAGE
    types[ids == config.video_token_id] = VIDEO
    images, videos = _grid(image_grid_thw), _grid(video_grid_thw)
    merge = config.vision_config.spatial_merge_size
    _check_pad_counts(types, IMAGE, images, merge, "image")
    _check_pad_counts(types, VIDEO, videos, merge, "video")
    positions, deltas = _RopeIndex(config).get_rope_index(
        torch.from_numpy(ids)[None],
        mm_token_type_ids=torch.from_numpy(types)[None],
        image_grid_thw=images,
        video_grid_thw=videos,
    )
    return positions[:, 0].numpy().astype(np.int64), int(deltas.reshape(-1)[0])
