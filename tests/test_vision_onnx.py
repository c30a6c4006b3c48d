"""The exported vision tower against the untouched HF tower, its grid-derived inputs, and the TensorRT builder."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl import modeling_qwen2_vl

from export import build_trt_engine
from export.vision_onnx import INPUT_NAMES, OUTPUT_NAME, main as export_main
from vlmserve.vit.runner import OnnxVitRunner
from vlmserve.vit.inputs import vision_position_ids, vision_segment_ids, vit_inputs

REPO_ROOT = Path(__file__).resolve().parents[1]
# Max abs error allowed between onnxruntime and torch on outputs of magnitude ~1 (fp32 both sides).
ATOL = 1e-4

# The export example is two images, [1, 4, 6] and [1, 6, 4]: every grid here differs from it.
GRIDS = {
    "one_image_other_size": [[1, 10, 8]],
    "two_images_of_different_sizes": [[1, 6, 10], [1, 4, 4]],
    "video": [[3, 6, 8]],
    "video_and_image": [[2, 4, 6], [1, 8, 4]],
    # Past what dense [heads, N, N] scores would make cheap: attention must stay per segment and exact.
    "image_of_10k_patches": [[1, 100, 100]],
}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Path, tmp_path_factory) -> Path:
    """``tiny_checkpoint`` with its vision weights redrawn at a trained network's scale.

    At the init std of 0.02 attention is nearly uniform: a wrong mask moves the outputs by
    ~5e-4 and wrong rotary positions by ~5e-6, too little for a float tolerance to catch.
    """
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.model.visual.parameters():
            if param.dim() > 1:  # Linear / Conv3d weights: unit-variance outputs
                fan_in = math.prod(param.shape[1:])
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
    out = tmp_path_factory.mktemp("vision-checkpoint")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def visual(checkpoint: Path) -> torch.nn.Module:
    return Qwen2VLForConditionalGeneration.from_pretrained(checkpoint).model.visual.eval()


@pytest.fixture(scope="module")
def onnx_path(checkpoint: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vit") / "vit.onnx"
    export_main([str(checkpoint), str(path)])
    return path


@pytest.fixture(scope="module")
def masked_onnx_path(checkpoint: Path, tmp_path_factory) -> Path:
    """The TensorRT export: same inputs, standard ops only."""
    path = tmp_path_factory.mktemp("vit-masked") / "vit.onnx"
    export_main([str(checkpoint), str(path), "--attention", "masked"])
    return path


def _pixels(grid: np.ndarray, visual: torch.nn.Module) -> np.ndarray:
    cfg = visual.config
    row = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    rows = int(grid.prod(axis=1).sum())
    return np.random.default_rng(0).standard_normal((rows, row)).astype(np.float32)


def _torch_embeds(visual: torch.nn.Module, pixels: np.ndarray, grid: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return visual(torch.from_numpy(pixels), torch.from_numpy(grid)).pooler_output.numpy()


def test_exported_graph_has_named_inputs_and_a_dynamic_patch_axis(onnx_path: Path):
    model = onnx.load(str(onnx_path))
    assert [i.name for i in model.graph.input] == list(INPUT_NAMES)
    assert [o.name for o in model.graph.output] == [OUTPUT_NAME]
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param, value.name
    onnx.checker.check_model(str(onnx_path), full_check=True)


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_onnx_matches_torch_tower(onnx_path: Path, visual: torch.nn.Module, grid: list[list[int]]):
    grid = np.array(grid, dtype=np.int64)
    pixels = _pixels(grid, visual)
    expected = _torch_embeds(visual, pixels, grid)
    got = OnnxVitRunner(onnx_path, intra_op_threads=1).encode(pixels, grid, visual.spatial_merge_size)
    tokens = grid.prod(axis=1).sum() // visual.spatial_merge_size**2
    assert got.shape == expected.shape == (tokens, visual.config.hidden_size)
    assert np.abs(expected).max() > 0.1  # outputs are O(1), so ATOL is a tight bound
    assert np.abs(got - expected).max() < ATOL


def test_attention_is_one_unmasked_multi_head_attention_per_segment(onnx_path: Path):
    """No [heads, N, N] scores in the ONNX Runtime graph: every block loops over segments."""
    model = onnx.load(str(onnx_path))
    main_ops = [n.op_type for n in model.graph.node]
    assert "Softmax" not in main_ops
    loops = [n for n in model.graph.node if n.op_type == "Loop"]
    assert len(loops) == 2  # the tiny tower's depth
    for loop in loops:
        body = next(a.g for a in loop.attribute if a.name == "body")
        attention = [n for n in body.node if n.op_type == "MultiHeadAttention"]
        # Three inputs: no key-padding mask or bias, which would send ORT to its N x N kernel.
        assert [(n.domain, len(n.input)) for n in attention] == [("com.microsoft", 3)]


@pytest.mark.parametrize("grid", ["two_images_of_different_sizes", "video_and_image"])
def test_tensorrt_graph_matches_torch_tower(masked_onnx_path: Path, visual: torch.nn.Module, grid: str):
    grid = np.array(GRIDS[grid], dtype=np.int64)
    pixels = _pixels(grid, visual)
    got = OnnxVitRunner(masked_onnx_path, intra_op_threads=1).encode(pixels, grid, visual.spatial_merge_size)
    assert np.abs(got - _torch_embeds(visual, pixels, grid)).max() < ATOL


def test_only_the_masked_graph_goes_to_tensorrt(onnx_path: Path, masked_onnx_path: Path):
    with pytest.raises(ValueError, match="--attention masked"):
        build_trt_engine.check_tensorrt_graph(onnx_path)
    build_trt_engine.check_tensorrt_graph(masked_onnx_path)


def test_wrong_positions_or_segments_would_fail_the_tolerance(onnx_path, visual):
    """The parity test has teeth: merging segments or dropping positions moves outputs far past ATOL."""
    grid = np.array(GRIDS["video_and_image"], dtype=np.int64)
    pixels = _pixels(grid, visual)
    expected = _torch_embeds(visual, pixels, grid)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    good = vit_inputs(pixels, grid, visual.spatial_merge_size)
    for name in ("position_ids", "segment_ids"):
        broken = {**good, name: np.zeros_like(good[name])}
        (got,) = session.run([OUTPUT_NAME], broken)
        assert np.abs(got - expected).max() > 100 * ATOL, name


def test_grid_inputs_match_what_hf_computes_inside_the_tower(visual, monkeypatch):
    """Record the position ids and cu_seqlens the HF forward itself derives from grid_thw."""
    seen = {}

    def recording(name, fn):
        def wrapper(*args, **kwargs):
            seen[name] = fn(*args, **kwargs)
            return seen[name]

        monkeypatch.setattr(modeling_qwen2_vl, name, wrapper)

    recording("get_vision_position_ids", modeling_qwen2_vl.get_vision_position_ids)
    recording("get_vision_attention_seqlens", modeling_qwen2_vl.get_vision_attention_seqlens)
    grid = np.array([[1, 4, 6], [3, 6, 4], [2, 2, 2]], dtype=np.int64)
    _torch_embeds(visual, _pixels(grid, visual), grid)

    np.testing.assert_array_equal(
        vision_position_ids(grid, visual.spatial_merge_size), seen["get_vision_position_ids"].numpy()
    )
    cu_seqlens = seen["get_vision_attention_seqlens"][0].numpy()
    hf_segments = np.repeat(np.arange(len(cu_seqlens) - 1), np.diff(cu_seqlens))
    np.testing.assert_array_equal(vision_segment_ids(grid), hf_segments)
    assert vision_segment_ids(grid).max() == 1 + 3 + 2 - 1  # one segment per temporal frame


def test_vit_inputs_dtypes_and_shape_check():
    grid = np.array([[2, 4, 4]])
    inputs = vit_inputs(np.zeros((32, 1176), np.float64), grid, 2)
    assert list(inputs) == list(INPUT_NAMES)
    assert [a.dtype for a in inputs.values()] == [np.float32, np.int64, np.int64]
    assert inputs["position_ids"].shape == (32, 2) and inputs["segment_ids"].shape == (32,)
    with pytest.raises(ValueError, match=r"\[32, C\*T\*P\*P\]"):
        vit_inputs(np.zeros((31, 1176), np.float32), grid, 2)


def _tensorrt_and_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    return build_trt_engine.cuda_device_count() > 0


def test_patch_profile_comes_from_the_processor_limits(tiny_checkpoint):
    assert build_trt_engine.ProcessorLimits().patch_profile() == (16, 5120, 5120)
    assert build_trt_engine.ProcessorLimits().patch_profile(max_images=3) == (16, 5120, 15360)
    # The tiny checkpoint ships Qwen2-VL-2B-Instruct's preprocessor_config (max_pixels 28*28*16384 = 65536
    # patches), capped like the served default at MAX_PATCHES_PER_IMAGE for the ViT's N x N attention.
    assert build_trt_engine.ProcessorLimits.from_checkpoint(tiny_checkpoint).patch_profile() == (16, 16384, 16384)
    with pytest.raises(ValueError, match="multiples of 4"):
        build_trt_engine.check_patch_profile((16, 100, 5122), merge_unit=4)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        build_trt_engine.check_patch_profile((64, 16, 5120), merge_unit=4)


def test_engine_build_without_tensorrt_or_gpu_exits_2(tmp_path):
    if _tensorrt_and_gpu():
        pytest.skip("tensorrt and a CUDA GPU are present: test_engine_build_on_gpu covers the build")
    plan = tmp_path / "vit.plan"
    result = subprocess.run(
        [sys.executable, "-m", "export.build_trt_engine", str(tmp_path / "vit.onnx"), str(plan)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "tensorrt is not importable" in result.stderr or "no CUDA GPU" in result.stderr
    assert not plan.exists()


@pytest.mark.skipif(not _tensorrt_and_gpu(), reason="needs the tensorrt package and a CUDA GPU")
def test_engine_build_on_gpu(masked_onnx_path, visual, tmp_path):
    import tensorrt as trt

    plan = build_trt_engine.build_engine(masked_onnx_path, tmp_path / "vit.plan", (16, 64, 256), "fp32")
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    assert names == [*INPUT_NAMES, OUTPUT_NAME]
    if not torch.cuda.is_available():
        pytest.skip("engine built; running it here needs a CUDA build of torch")

    grid = np.array(GRIDS["video_and_image"], dtype=np.int64)
    pixels = _pixels(grid, visual)
    context = engine.create_execution_context()
    buffers = {}
    for name, array in vit_inputs(pixels, grid, visual.spatial_merge_size).items():
        buffers[name] = torch.from_numpy(array).cuda()
        context.set_input_shape(name, array.shape)
        context.set_tensor_address(name, buffers[name].data_ptr())
    out = torch.empty(tuple(context.get_tensor_shape(OUTPUT_NAME)), dtype=torch.float32, device="cuda")
    context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    # fp32 engine (TF32 off): same math as torch, different kernels.
    assert np.abs(out.cpu().numpy() - _torch_embeds(visual, pixels, grid)).max() < 1e-3
