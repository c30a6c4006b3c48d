"""Several media in few ViT calls: the packed results equal encoding each medium alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.vision_onnx import export_vision_onnx
from tests.test_vision_onnx import checkpoint  # noqa: F401  (vision weights at a trained scale: see there)
from vlmserve.vit.runner import OnnxVitRunner
from vlmserve.vit.packing import pack_vit_calls, split_embeddings

MERGE = 2
ROW = 3 * 2 * 14 * 14
# Two images and a video of 3 temporal frames of 24 patches.
GRIDS = [np.array([1, 4, 6]), np.array([1, 2, 2]), np.array([3, 4, 6])]
# Same tolerance as the ONNX-vs-torch parity tests: other call shapes may pick other kernels.
ATOL = 1e-4


@pytest.fixture(scope="module")
def encoder(checkpoint: Path, tmp_path_factory) -> OnnxVitRunner:  # noqa: F811
    return OnnxVitRunner(export_vision_onnx(checkpoint, tmp_path_factory.mktemp("vit") / "vit.onnx"), 1)


def pixels(grids: list[np.ndarray]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((int(g.prod()), ROW)).astype(np.float32) for g in grids]


def test_frames_are_packed_up_to_the_budget():
    calls = pack_vit_calls(pixels(GRIDS), GRIDS, MERGE, max_patches=48)
    # 24 + 4 fit, the next 24-patch frame does not; then video frames two by two.
    assert [len(c["segment_ids"]) for c in calls] == [28, 48, 24]
    assert [c["segment_ids"].tolist() for c in calls][0] == [0] * 24 + [1] * 4
    assert calls[1]["segment_ids"].tolist() == [0] * 24 + [1] * 24
    for call in calls:
        assert call["pixel_values"].dtype == np.float32 and call["position_ids"].shape == (len(call["pixel_values"]), 2)
    assert pack_vit_calls([], [], MERGE, 48) == []


def test_a_frame_above_the_budget_goes_alone():
    calls = pack_vit_calls(pixels(GRIDS[:2]), GRIDS[:2], MERGE, max_patches=8)
    assert [len(c["segment_ids"]) for c in calls] == [24, 4]


@pytest.mark.parametrize("max_patches", [16384, 48, 24, 1])
def test_packed_calls_match_one_call_per_medium(encoder, max_patches):
    values = pixels(GRIDS)
    alone = [encoder.encode(p, g[None, :], MERGE) for p, g in zip(values, GRIDS)]
    calls = pack_vit_calls(values, GRIDS, MERGE, max_patches)
    packed = split_embeddings([encoder.run(call) for call in calls], GRIDS, MERGE)
    assert [p.shape for p in packed] == [a.shape for a in alone]
    for got, expected in zip(packed, alone):
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_the_comparison_has_teeth(encoder):
    """Packing two images with one attention segment would be far outside the tolerance."""
    values = pixels(GRIDS[:2])
    alone = np.concatenate([encoder.encode(p, g[None, :], MERGE) for p, g in zip(values, GRIDS[:2])])
    (call,) = pack_vit_calls(values, GRIDS[:2], MERGE, 16384)
    merged = encoder.run({**call, "segment_ids": np.zeros_like(call["segment_ids"])})
    assert np.abs(merged - alone).max() > 100 * ATOL


def test_split_checks_the_token_count():
    with pytest.raises(ValueError, match="3 embeddings for 6 tokens"):
        split_embeddings([np.zeros((3, 8), np.float32)], GRIDS[:1], MERGE)
