"""Packing the media of one request into as few ViT calls as a patch budget allows, unpacking, and the
memory a call may take.

Why the `vlm` model batches instead of Triton: the ViT's patch dimension is ragged, and Triton
batches ragged inputs of a TensorRT plan only as flattened 1-D tensors and scatters outputs only in
the shape of an input (a call returns a quarter as many rows as it gets). Here each call's
``segment_ids`` are numbered from 0 instead. Every temporal frame of every medium is its own
attention segment, so a call may hold any run of whole frames: a long video is split over several
calls and small images share one, with results identical to encoding each medium alone. Calls run
concurrently on however many `vit` instances.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmserve.contracts import VIT
from vlmserve.vit.inputs import vision_position_ids

# The TensorRT graph's masked attention costs (patches in the call)^2 however the segments split them, so
# packing k media multiplies their attention work by about k. In the Qwen2-VL tower (32 blocks of width 1280,
# the same for 2B/7B/72B) the linear layers cost ~1.3 GFLOP per patch and attention ~0.16 MFLOP per
# patch per patch in the call: at 4096 patches attention is about a third of the work, so packing
# small media up to here buys fewer, fuller calls cheaply; larger media go alone.
MAX_PATCHES_PER_CALL = 4096
# The ONNX Runtime graph attends per segment, so packing costs no attention there, but it buys little
# either: a CPU is busy with one image already. 1 thread, a tower of width 256, depth 8: 16 x 64-patch
# images 0.137 s alone, 0.119 s packed by 256, 0.120 s by 4096; 8 x 256 patches 0.25 s alone or by 1024,
# 0.29 s by 4096; 4 x 1024 patches 0.70 s alone, 0.85 s in one call.
CPU_MAX_PATCHES_PER_CALL = 256

# A CPU `vit` process (Triton's Python stub, numpy, ONNX Runtime) before its first call: 66 MB measured
# with the tiny tower; the rest is headroom for allocator and thread-pool slack.
VIT_PROCESS_BASE_BYTES = 400 * 2**20


def vit_memory_bound(max_call_patches: int, patch_row: int, embed_dim: int, weight_bytes: int) -> int:
    """Upper bound of a CPU `vit` process's peak RSS in bytes, for calls of at most ``max_call_patches``.

    With attention per segment (export/vision_onnx.py) nothing grows with the square of the patches:
    per patch, the float32 input three times (Triton's copy, ours, ONNX Runtime's) and at most 16
    activations of ``embed_dim`` floats alive at once; the weights twice (file bytes and the session's
    copy while it loads). ``max_call_patches`` is the larger of the packing budget and one frame at
    max_pixels (a larger frame goes alone), so the bound grows linearly with max_pixels.
    """
    per_patch = 4 * (3 * patch_row + 16 * embed_dim)
    return VIT_PROCESS_BASE_BYTES + 2 * weight_bytes + max_call_patches * per_patch


@dataclass(frozen=True)
class _Frame:
    item: int
    start: int  # first patch row of the frame in the item's pixel values
    stop: int


def _frames(grids: list[np.ndarray]) -> list[_Frame]:
    frames = []
    for item, (t, h, w) in enumerate(np.asarray(g, dtype=np.int64).reshape(3).tolist() for g in grids):
        frames.extend(_Frame(item, f * h * w, (f + 1) * h * w) for f in range(t))
    return frames


def pack_vit_calls(pixel_values: list[np.ndarray], grids: list[np.ndarray], merge_size: int,
                   max_patches: int) -> list[dict[str, np.ndarray]]:
    """Inputs of the ViT calls that encode all items, in order; a frame above ``max_patches`` goes alone."""
    if not grids:
        return []
    positions = [vision_position_ids(np.asarray(g).reshape(1, 3), merge_size) for g in grids]
    calls: list[list[_Frame]] = [[]]
    size = 0
    for frame in _frames(grids):
        rows = frame.stop - frame.start
        if calls[-1] and size + rows > max_patches:
            calls.append([])
            size = 0
        calls[-1].append(frame)
        size += rows
    return [{
        VIT.PIXEL_VALUES.name: np.ascontiguousarray(
            np.concatenate([pixel_values[f.item][f.start:f.stop] for f in frames]), dtype=np.float32),
        VIT.POSITION_IDS.name: np.concatenate([positions[f.item][f.start:f.stop] for f in frames]),
        VIT.SEGMENT_IDS.name: np.repeat(np.arange(len(frames), dtype=np.int64), [f.stop - f.start for f in frames]),
    } for frames in calls]


def split_embeddings(outputs: list[np.ndarray], grids: list[np.ndarray], merge_size: int) -> list[np.ndarray]:
    """The ViT outputs of ``pack_vit_calls``' calls, in call order, cut back into one array per item."""
    tokens = [int(np.prod(g)) // merge_size**2 for g in grids]
    embeds = np.concatenate(outputs) if len(outputs) > 1 else outputs[0]
    if len(embeds) != sum(tokens):
        raise ValueError(f"the ViT returned {len(embeds)} embeddings for {sum(tokens)} tokens")
    return np.split(embeds, np.cumsum(tokens)[:-1])
