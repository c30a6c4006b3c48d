"""Media decoding and vision preprocessing against transformers' Qwen2-VL processor.

Images are compared with ``Qwen2VLImageProcessorPil`` on the undecoded PIL
image. HF's video processor needs torchvision, which is not installed, so the
video patch layout is checked against an independent loop construction and
against the image path (a temporal pair of identical frames is an image).
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from vlmserve.errors import InvalidRequest
from vlmserve.media.decode import MediaError, VideoFrames, decode_image, decode_video, image_size, sample_indices
from vlmserve.media.preprocessing import VisionPreprocessor
from vlmserve.media.settings import (
    FPS_MIN_FRAMES,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    MediaSettings,
    capped_max_pixels,
)

# preprocessor_config.json as Qwen2-VL-2B-Instruct ships it.
QWEN2_VL_2B_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}
MEAN = np.array(QWEN2_VL_2B_PREPROCESSOR["image_mean"])
STD = np.array(QWEN2_VL_2B_PREPROCESSOR["image_std"])
PATCH, MERGE, TEMPORAL = 14, 2, 2

# Source videos: frame i is uniformly grey at level 10 + 12 * i, so sampled frames identify themselves.
GREY_START, GREY_STEP = 10, 12


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qwen2-vl-2b")
    (path / "preprocessor_config.json").write_text(json.dumps(QWEN2_VL_2B_PREPROCESSOR))
    return path


@pytest.fixture(scope="module")
def preprocessor(checkpoint_dir) -> VisionPreprocessor:
    return VisionPreprocessor.from_pretrained(checkpoint_dir)


@pytest.fixture(scope="module")
def hf_processor(checkpoint_dir) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil.from_pretrained(str(checkpoint_dir))


def make_image(height: int, width: int, mode: str, seed: int = 0) -> Image.Image:
    """Noise over a gradient (so resizing has something to do), in ``mode``."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
    rgba = np.clip(ramp + rng.integers(-40, 40, (height, width, 4)), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    if mode == "P":
        image = image.convert("RGB").quantize(64)
        image.info["transparency"] = 0  # palette entry 0 transparent: exercises the white compositing
        return image
    return image.convert(mode)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def make_video(num_frames: int, fps: int = 10, width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            grey = np.full((height, width, 3), GREY_START + GREY_STEP * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(grey, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def source_index(frame: np.ndarray) -> int:
    """Which source frame this decoded frame is (codec noise is far below GREY_STEP / 2)."""
    return round((float(frame.mean()) - GREY_START) / GREY_STEP)


# --- images --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height, width",
    [(48, 64), (224, 224), (37, 531), (1000, 700), (20, 20)],
)
@pytest.mark.parametrize(
    "mode, fmt",
    [("RGB", "PNG"), ("RGB", "JPEG"), ("RGBA", "PNG"), ("L", "PNG"), ("L", "JPEG"), ("P", "PNG"), ("RGB", "WEBP")],
)
def test_image_matches_hf(preprocessor, hf_processor, height, width, mode, fmt):
    data = encode(make_image(height, width, mode), fmt)
    pixel_values, grid_thw = preprocessor.image(decode_image(data))
    # The reference gets the image flattened onto white, as vLLM's and qwen-vl-utils' loaders (and
    # newer transformers releases' convert_to_rgb) do; transformers 5.19, which vLLM 0.32 accepts, still
    # drops the alpha channel onto black.
    original = Image.open(io.BytesIO(data))
    if "A" in original.getbands() or original.info.get("transparency") is not None:
        rgba = original.convert("RGBA")
        original = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    expected = hf_processor(images=original.convert("RGB"), return_tensors="np")
    np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"][0])
    np.testing.assert_allclose(pixel_values, expected["pixel_values"], rtol=0, atol=1e-6)
    assert pixel_values.dtype == np.float32 and grid_thw.dtype == np.int64
    resized_h, resized_w = smart_resize(height, width, 28, 3136, 12845056)
    assert grid_thw.tolist() == [1, resized_h // PATCH, resized_w // PATCH]
    assert pixel_values.shape == (int(np.prod(grid_thw)), 3 * TEMPORAL * PATCH * PATCH)


def test_decode_image_composites_transparency_on_white():
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert decode_image(encode(transparent, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_decode_image_takes_first_gif_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    image = decode_image(buffer.getvalue())
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 0, 0)


def test_image_pixel_overrides_follow_smart_resize(preprocessor, hf_processor):
    image = make_image(1000, 800, "RGB")
    _, default_grid = preprocessor.image(image)
    max_pixels = 256 * 28 * 28
    pixel_values, grid = preprocessor.image(image, max_pixels=max_pixels)
    h, w = smart_resize(1000, 800, 28, 3136, max_pixels)
    assert grid.tolist() == [1, h // PATCH, w // PATCH] != default_grid.tolist()
    assert h * w <= max_pixels
    expected = hf_processor(images=image, size={"shortest_edge": 3136, "longest_edge": max_pixels})
    np.testing.assert_array_equal(pixel_values, expected["pixel_values"])

    tiny = make_image(20, 30, "RGB")
    min_pixels = 64 * 28 * 28
    _, grid = preprocessor.image(tiny, min_pixels=min_pixels)
    h, w = smart_resize(20, 30, 28, min_pixels, 12845056)
    assert grid.tolist() == [1, h // PATCH, w // PATCH] and h * w >= min_pixels


def test_num_vision_tokens(preprocessor):
    assert preprocessor.num_vision_tokens(np.array([1, 16, 28])) == 112
    assert preprocessor.num_vision_tokens(np.array([[1, 16, 28], [2, 4, 4]])) == 112 + 8


def test_extreme_aspect_ratio_is_media_error(preprocessor):
    with pytest.raises(MediaError, match="aspect ratio"):
        preprocessor.image(Image.new("RGB", (1000, 4)))


# --- checkpoint configuration --------------------------------------------------------------------


def test_from_pretrained_reads_checkpoint(preprocessor, checkpoint_dir):
    assert (preprocessor.patch_size, preprocessor.merge_size, preprocessor.temporal_patch_size) == (14, 2, 2)
    limits = preprocessor.media_settings()
    assert (limits.video_min_pixels, limits.video_max_pixels) == (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)
    # The same limits without the HF processor (what export.build_trt_engine reads).
    assert MediaSettings.from_checkpoint(checkpoint_dir) == limits
    hf_size = preprocessor._processor.size  # what the HF processor itself read; served capped for the ViT
    assert (limits.min_pixels, limits.max_pixels) == (hf_size.shortest_edge, capped_max_pixels(hf_size.longest_edge, 14))


def test_from_pretrained_video_config_and_overrides(checkpoint_dir, tmp_path):
    (tmp_path / "preprocessor_config.json").write_text((checkpoint_dir / "preprocessor_config.json").read_text())
    (tmp_path / "video_preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 64 * 28 * 28, "longest_edge": 256 * 28 * 28}})
    )
    limits = VisionPreprocessor.from_pretrained(tmp_path).media_settings()
    assert (limits.video_min_pixels, limits.video_max_pixels) == (64 * 28 * 28, 256 * 28 * 28)
    limits = limits.with_parameters({"video_max_pixels": str(100 * 28 * 28), "video_total_pixels": "5"})
    assert (limits.video_min_pixels, limits.video_max_pixels, limits.video_total_pixels) == (
        64 * 28 * 28, 100 * 28 * 28, 5)


# --- video decoding ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_frames, fps, max_frames, expected",
    [
        (20, 2.0, 768, [0, 5, 10, 15]),  # 2 s * 2 fps = 4 frames
        (20, 4.0, 768, [0, 2, 5, 7, 10, 12, 15, 17]),  # 8 frames, float32 steps of 2.5 truncated
        (20, 1.0, 768, [0, 5, 10, 15]),  # 2 frames, raised to min_frames=4
        (20, 4.0, 6, [0, 3, 6, 10, 13, 16]),  # capped at max_frames
        (20, 2.5, 768, [0, 5, 10, 15]),  # 5 floors to 4 (by FRAME_FACTOR=2)
        (3, 2.0, 768, [0, 1]),  # shorter than min_frames: as many even frames as there are
    ],
)
def test_decode_video_samples_like_the_video_processor(num_frames, fps, max_frames, expected):
    video = decode_video(make_video(num_frames), fps=fps, max_frames=max_frames)
    assert isinstance(video, VideoFrames)
    assert video.frames.dtype == np.uint8 and video.frames.shape == (len(expected), 48, 64, 3)
    assert video.indices.tolist() == expected
    assert [source_index(frame) for frame in video.frames] == expected
    assert (video.total_frames, video.video_fps) == (num_frames, 10.0)
    assert video.sample_fps == pytest.approx(len(expected) / num_frames * 10.0)


@pytest.mark.parametrize("total_frames", [4, 7, 20, 29, 61, 150, 451, 1000, 2400])
@pytest.mark.parametrize("video_fps", [7.0, 23.976, 25.0, 30.0])
@pytest.mark.parametrize("fps, max_frames", [(0.5, 768), (1.0, 768), (2.0, 768), (2.0, 16), (3.7, 64), (24.0, 768)])
def test_frame_sampling_is_transformers_and_vllms(total_frames, video_fps, fps, max_frames):
    """The frames transformers' Qwen2VLVideoProcessor picks, and those of vLLM's Qwen2-VL video loader (which
    clamps a tail index past the end onto the last frame), so both servers give the model the same video."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.video_utils import VideoMetadata
    from vllm.multimodal.video import Qwen2VLVideoBackend, VideoSourceMetadata, VideoTargetMetadata

    ours = sample_indices(total_frames, video_fps, fps, FPS_MIN_FRAMES, max_frames).tolist()
    metadata = VideoMetadata(total_num_frames=total_frames, fps=video_fps)
    hf = Qwen2VLVideoProcessor().sample_frames(metadata, fps=fps, max_frames=max_frames).tolist()
    assert ours == [min(index, total_frames - 1) for index in hf]
    source = VideoSourceMetadata(total_frames, video_fps, total_frames / video_fps)
    vllm = Qwen2VLVideoBackend.compute_frames_index_to_sample(source, VideoTargetMetadata(-1, fps, 300),
                                                              max_frames=max_frames)
    assert ours == vllm


def test_video_default_grid(preprocessor):
    video = decode_video(make_video(20), fps=2.0)
    pixel_values, grid = preprocessor.video(video.frames)
    # 4 frames of 48x64 are raised to VIDEO_MIN_PIXELS (128*28*28): smart_resize gives 280x392.
    assert grid.tolist() == [2, 20, 28]
    assert pixel_values.shape == (2 * 20 * 28, 3 * TEMPORAL * PATCH * PATCH) and pixel_values.dtype == np.float32
    assert preprocessor.num_vision_tokens(grid) == 280


# --- video patches -------------------------------------------------------------------------------


def normalized(frames: np.ndarray) -> np.ndarray:
    """[T, H, W, C] uint8 -> [T, C, H, W] float64, the processor's rescale + normalize."""
    return ((frames / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)


def expected_video_patches(frames: np.ndarray) -> np.ndarray:
    """Qwen2-VL's documented patch order, written as loops: temporal group, merge block, patch in block;
    each patch vector is channel, frame in the group, pixel row, pixel column."""
    video = normalized(frames)
    _, channels, height, width = video.shape
    rows = []
    for t in range(0, len(video), TEMPORAL):
        for block_y in range(0, height, PATCH * MERGE):
            for block_x in range(0, width, PATCH * MERGE):
                for y in range(block_y, block_y + PATCH * MERGE, PATCH):
                    for x in range(block_x, block_x + PATCH * MERGE, PATCH):
                        patch = video[t : t + TEMPORAL, :, y : y + PATCH, x : x + PATCH]  # (T, C, P, P)
                        rows.append(patch.transpose(1, 0, 2, 3).reshape(-1))
    return np.stack(rows)


def random_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def test_video_patch_layout_matches_loop_construction(preprocessor):
    # 56x84 is already a multiple of 28 inside the limits, so frames are not resampled.
    frames = random_frames(4, 56, 84)
    pixel_values, grid = preprocessor.video(frames, min_pixels=56 * 56)
    assert grid.tolist() == [2, 4, 6]
    np.testing.assert_allclose(pixel_values, expected_video_patches(frames), rtol=0, atol=1e-6)


def split_temporal(pixel_values: np.ndarray) -> np.ndarray:
    """[N, C*T*P*P] -> [N, C, T, P*P]."""
    return pixel_values.reshape(len(pixel_values), 3, TEMPORAL, PATCH * PATCH)


def test_video_temporal_pairs_against_image_path(preprocessor):
    a, b = random_frames(2, 100, 150, seed=1)
    limits = {"min_pixels": 3136, "max_pixels": 12845056}
    image_a, image_grid = preprocessor.image(Image.fromarray(a), **limits)
    image_b, _ = preprocessor.image(Image.fromarray(b), **limits)

    # A pair of identical frames is exactly what the image path produces.
    same, grid = preprocessor.video(np.stack([a, a]), **limits)
    np.testing.assert_array_equal(grid, image_grid)
    np.testing.assert_array_equal(same, image_a)

    # Each patch vector holds frame 0 then frame 1 per channel; swapping the frames swaps those halves.
    ab = split_temporal(preprocessor.video(np.stack([a, b]), **limits)[0])
    ba = split_temporal(preprocessor.video(np.stack([b, a]), **limits)[0])
    np.testing.assert_array_equal(ab[:, :, 0], split_temporal(image_a)[:, :, 0])
    np.testing.assert_array_equal(ab[:, :, 1], split_temporal(image_b)[:, :, 1])
    np.testing.assert_array_equal(ab[:, :, ::-1], ba)


def test_video_odd_frame_count_repeats_last_frame(preprocessor):
    frames = random_frames(3, 56, 84, seed=2)
    odd, grid = preprocessor.video(frames, min_pixels=56 * 56)
    padded, _ = preprocessor.video(np.concatenate([frames, frames[-1:]]), min_pixels=56 * 56)
    assert grid.tolist() == [2, 4, 6]
    np.testing.assert_array_equal(odd, padded)


def test_video_total_pixel_budget(preprocessor):
    frames = np.zeros((4, 640, 640, 3), np.uint8)
    # qwen-vl-utils: max_pixels = max(min(768*28*28, 627200 / 4 * 2), int(128*28*28 * 1.05)) = 313600 = 560*560.
    _, grid = preprocessor.video(frames, total_pixels=627200)
    assert grid.tolist() == [2, 40, 40]
    # The default budget leaves the per-frame cap (768*28*28) in charge: 640 rounds to 644 = 46 patches.
    _, grid = preprocessor.video(frames)
    assert grid.tolist() == [2, 46, 46]
    # An explicit max_pixels replaces the computed one.
    _, grid = preprocessor.video(frames, max_pixels=200 * 28 * 28)
    h, w = smart_resize(640, 640, 28, VIDEO_MIN_PIXELS, 200 * 28 * 28)
    assert grid.tolist() == [2, h // PATCH, w // PATCH]


# --- errors --------------------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming ``width`` x ``height``, with almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_media_error_is_an_invalid_request():
    assert issubclass(MediaError, ValueError) and issubclass(MediaError, InvalidRequest)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (np.random.default_rng(0).bytes(4096), "not an image"),
        (encode(make_image(200, 300, "RGB"), "PNG")[:3000], "corrupt or truncated"),
        (encode(make_image(200, 300, "RGB"), "JPEG")[:1500], "corrupt or truncated"),
        (png_header_only(100_000, 100_000), "too large"),
    ],
    ids=["empty", "random", "truncated-png", "truncated-jpeg", "bomb"],
)
def test_decode_image_errors(data, message):
    with pytest.raises(MediaError, match=message):
        decode_image(data)


def test_decode_image_pixel_limit_is_the_parameter():
    data = encode(make_image(64, 64, "RGB"), "PNG")
    with pytest.raises(MediaError, match="64x64 = 4096 pixels, the limit is 4000"):
        decode_image(data, max_image_pixels=4000)
    # Above PIL's own warning threshold but within ours: no DecompressionBombWarning leaks,
    # and the missing pixel data is reported as corruption.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(MediaError, match="corrupt or truncated"):
            decode_image(png_header_only(10_000, 10_000), max_image_pixels=200_000_000)


def audio_only() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (np.random.default_rng(0).bytes(4096), "corrupt or undecodable"),
        (make_video(20)[:2000], "corrupt or undecodable"),
        (audio_only(), "no video stream"),
        (make_video(1), "too short"),
    ],
    ids=["empty", "random", "truncated", "audio-only", "one-frame"],
)
def test_decode_video_errors(data, message):
    with pytest.raises(MediaError, match=message):
        decode_video(data, fps=2.0)


def test_decode_video_frame_pixel_limit():
    with pytest.raises(MediaError, match="64x48 = 3072 pixels, the limit is 3000"):
        decode_video(make_video(4), fps=2.0, max_frame_pixels=3000)


@pytest.mark.parametrize("height, width", [(48, 64), (1000, 700), (37, 531), (1080, 1920), (20, 20)])
@pytest.mark.parametrize("min_pixels, max_pixels", [(3136, 12845056), (3136, 256 * 28 * 28), (64 * 28 * 28, 1003520)])
def test_an_image_grid_from_its_header_is_the_preprocessed_one(preprocessor, height, width, min_pixels, max_pixels):
    """An LLM host whose ViT runs elsewhere admits a request from the grids its images' headers give."""
    buffer = io.BytesIO()
    make_image(height, width, "RGB").save(buffer, format="JPEG")
    data = buffer.getvalue()
    assert image_size(data) == (width, height)
    _, grid = preprocessor.image(decode_image(data), min_pixels, max_pixels)
    assert preprocessor.image_grid(height, width, min_pixels, max_pixels).tolist() == grid.tolist()


def test_an_image_header_is_checked_as_decoding_checks_it():
    buffer = io.BytesIO()
    make_image(100, 100, "RGB").save(buffer, format="PNG")
    with pytest.raises(MediaError, match="too large"):
        image_size(buffer.getvalue(), max_image_pixels=9999)
    for data in (b"", b"not an image"):
        with pytest.raises(MediaError):
            image_size(data)
