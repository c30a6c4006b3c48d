"""Decoding user-supplied image and video bytes (fetching URLs happens elsewhere).

Everything that is wrong with the bytes themselves (not an image, truncated,
undecodable, too large) raises :class:`MediaError`, so the Triton model can
answer with a client error instead of crashing. Video frames are sampled as
transformers' ``Qwen2VLVideoProcessor`` samples them, which is what vLLM's own
Qwen2-VL video loader does, so both servers feed the model the same frames.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import av
import numpy as np
import torch
from PIL import Image

from vlmserve.errors import InvalidRequest
from vlmserve.media.settings import DECODE_VIDEO_PIXEL_LIMIT, FPS_MAX_FRAMES, FPS_MIN_FRAMES, FRAME_FACTOR

T = TypeVar("T")

# PIL's own default limit (~89.5 MP, 1024**3 // 4 // 3): roughly a 9500x9500 photo.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class MediaError(InvalidRequest):
    """The image or video the user sent cannot be used (a ``ValueError``)."""


@dataclass(frozen=True)
class VideoFrames:
    """Frames sampled from a video, as the model will see them."""

    frames: np.ndarray  # uint8 [T, H, W, 3], RGB
    indices: np.ndarray  # int64 [T], which decoded source frames were kept
    total_frames: int  # number of frames decoded from the source
    video_fps: float  # the source's average frame rate
    sample_fps: float  # frames per second of ``frames`` (temporal positions need it)


def decode_image(data: bytes, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode PNG/JPEG/WebP/GIF/... bytes into a fully loaded RGB image.

    Animated images give their first frame. The pixel limit is checked on the
    header, before any pixel data is decompressed; PIL's own hard stop
    (``2 * PIL.Image.MAX_IMAGE_PIXELS``) still applies above it.
    """
    return _read_image(data, max_image_pixels, lambda image: _convert_rgb(_loaded(image)))


def image_size(data: bytes, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of image bytes from their header alone, within the same checks as `decode_image`
    short of decoding the pixels."""
    return _read_image(data, max_image_pixels, lambda image: image.size)


def _loaded(image: Image.Image) -> Image.Image:
    image.load()  # decode now, so truncated or corrupt data fails here
    return image


def _read_image(data: bytes, max_image_pixels: int, read: Callable[[Image.Image], T]) -> T:
    """``read`` of the opened image, once its header passed the pixel limit; MediaError for bad bytes."""
    if not data:
        raise MediaError("image data is empty")
    try:
        with warnings.catch_warnings():
            # PIL's global bomb warning is superseded by the explicit limit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_image_pixels:
            raise MediaError(
                f"image is too large: {width}x{height} = {width * height} pixels, "
                f"the limit is {max_image_pixels}"
            )
        return read(image)
    except MediaError:
        raise
    except Image.UnidentifiedImageError:
        raise MediaError("data is not an image in a supported format") from None
    except Image.DecompressionBombError:
        # PIL's own hard stop (2 * Image.MAX_IMAGE_PIXELS) fired inside open(), before our check.
        raise MediaError(f"image is too large: the limit is {max_image_pixels} pixels") from None
    except Exception as exc:  # decoders raise many types on hostile input; all mean bad bytes
        raise MediaError(f"image data is corrupt or truncated: {exc}") from None


def _convert_rgb(image: Image.Image) -> Image.Image:
    """RGB the way vLLM's and qwen-vl-utils' image loaders (and newer transformers releases) make it.

    Transparent pixels are composited onto white (not PIL's default black), so
    the model sees the same pixels as it does behind vLLM's own server.
    """
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_video(
    data: bytes,
    fps: float,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int = FPS_MAX_FRAMES,
    max_frame_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_video_pixels: int = DECODE_VIDEO_PIXEL_LIMIT,
) -> VideoFrames:
    """Decode a video and sample ``fps`` frames per second (``sample_indices``).

    The source frame count is the number of frames actually decoded, not the
    container's claim (a container may miscount). The sampled
    frames are held at the source size, so their pixels together are checked
    against ``max_video_pixels`` on the header and packet count, before decoding.
    """
    if not data:
        raise MediaError("video data is empty")
    if not fps > 0:
        raise MediaError(f"video fps must be positive, got {fps}")
    try:
        video_fps, total_frames, width, height = _probe(data, max_frame_pixels)
        indices = sample_indices(total_frames, video_fps, fps, min_frames, max_frames)
        _check_sampled_size(len(indices), width, height, max_video_pixels)
        frames, decoded = _decode_selected(data, indices)
        if decoded != total_frames:
            # Some codecs/containers do not map one packet to one frame: resample with the true count.
            total_frames = decoded
            indices = sample_indices(total_frames, video_fps, fps, min_frames, max_frames)
            _check_sampled_size(len(indices), width, height, max_video_pixels)
            frames, _ = _decode_selected(data, indices)
    except MediaError:
        raise
    except Exception as exc:  # demuxers/decoders raise many types on hostile input; all mean bad bytes
        reason = getattr(exc, "strerror", None) or exc  # FFmpeg errors: without the errno noise
        raise MediaError(f"video data is corrupt or undecodable: {reason}") from None
    return VideoFrames(
        frames=np.stack(frames),
        indices=indices,
        total_frames=total_frames,
        video_fps=video_fps,
        sample_fps=len(indices) / total_frames * video_fps,
    )


def sample_indices(
    total_frames: int, video_fps: float, fps: float, min_frames: int, max_frames: int
) -> np.ndarray:
    """Source frame indices kept for the model, by transformers' ``Qwen2VLVideoProcessor.sample_frames``
    for ``fps``, as vLLM's Qwen2-VL video loader ports it.

    ``total / video_fps * fps`` frames, clamped to [min_frames, max_frames] and the video's length,
    floored to a multiple of FRAME_FACTOR; the indices come from the same ``torch.arange`` call, whose
    float32 steps decide which frames are picked. A tail index at the end is clamped onto the last
    frame, as vLLM does.
    """
    upper = math.floor(min(max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    wanted = min(max(total_frames / video_fps * fps, min_frames), upper)  # upper <= total_frames
    nframes = math.floor(wanted / FRAME_FACTOR) * FRAME_FACTOR
    if nframes < FRAME_FACTOR:
        raise MediaError(
            f"video is too short: it has {total_frames} frame(s), at least {FRAME_FACTOR} are needed"
        )
    indices = torch.arange(0, total_frames, total_frames / nframes).int().numpy().astype(np.int64)
    return np.minimum(indices, total_frames - 1)


def _open_video_stream(container: av.container.InputContainer) -> av.VideoStream:
    if not container.streams.video:
        raise MediaError("data has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threading; output is identical, decode is faster
    return stream


def _check_sampled_size(frames: int, width: int, height: int, max_video_pixels: int) -> None:
    if frames * width * height > max_video_pixels:
        raise MediaError(
            f"video is too large: {frames} sampled frames of {width}x{height} = {frames * width * height} pixels, "
            f"the limit is {max_video_pixels}; ask for fewer frames (fps, max_frames)"
        )


def _probe(data: bytes, max_frame_pixels: int) -> tuple[float, int, int, int]:
    """Average frame rate, number of video packets, frame width and height, without decoding."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = _open_video_stream(container)
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_frame_pixels:
            raise MediaError(
                f"video frames are too large: {width}x{height} = {width * height} pixels, "
                f"the limit is {max_frame_pixels}"
            )
        rate = stream.average_rate or stream.guessed_rate
        if not rate or rate <= 0:
            raise MediaError("video has no usable frame rate")
        # Demuxing is cheap; it lets one decoding pass keep only the sampled frames.
        packets = sum(1 for packet in container.demux(stream) if packet.size)
    return float(rate), packets, width, height


def _decode_selected(data: bytes, indices: np.ndarray) -> tuple[list[np.ndarray], int]:
    """RGB frames at ``indices`` (presentation order; a clamped tail index repeats the last frame) and the
    number of frames decoded."""
    wanted = set(indices.tolist())
    kept: dict[int, np.ndarray] = {}
    count = 0
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = _open_video_stream(container)
        width, height = stream.codec_context.width, stream.codec_context.height
        for frame in container.decode(stream):
            if count in wanted:
                # A fixed output size guards against mid-stream resolution changes.
                kept[count] = frame.to_ndarray(format="rgb24", width=width, height=height)
            count += 1
    return [kept[index] for index in indices.tolist() if index in kept], count
