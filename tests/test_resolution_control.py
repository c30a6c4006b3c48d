"""Resolution control per image/video part: min_pixels / max_pixels / detail on images, max_frames on videos.

Units: the schema, the translation to the `vlm` model's parts, the clamping into the server's limits
and the decoded-size guard of videos. Served: one stack of its own with small server limits, where
each option shows in `usage.prompt_tokens` by exactly the visual tokens smart_resize predicts.
"""

from __future__ import annotations

import dataclasses

import openai
import pytest
from pydantic import ValidationError
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from openai_proxy.chat_schemas import ChatCompletionRequest, ImageURLPart, VideoURLPart
from openai_proxy.messages import to_hf_messages
from tests.conftest import running_stack
from tests.proxy_helpers import user
from tests.test_end_to_end import mp4_bytes, png_bytes
from vlmserve.media import decode as media
from vlmserve.errors import InvalidRequest
from vlmserve.media.decode import MediaError, decode_video
from vlmserve.media.settings import LOW_DETAIL_MAX_PIXELS, MediaSettings, MediumOptions

MODEL = "tiny-qwen2-vl"
FACTOR = 28  # the tiny checkpoint's patch size (14) x spatial merge size (2): one LLM token per 28x28 pixels
SERVER = MediaSettings(min_pixels=56 * 56, max_pixels=560 * 560, video_min_pixels=128 * 28 * 28,
                       video_max_pixels=768 * 28 * 28, video_total_pixels=24576 * 28 * 28, max_frames=768)
# The served stack's limits: images up to 560x560 (above the low-detail budget), and a video budget that
# holds 8 sampled frames of the 84x56 test video but not 12.
SERVED_MEDIA = {"min_pixels": str(SERVER.min_pixels), "max_pixels": str(SERVER.max_pixels),
                "max_video_pixels": str(8 * 84 * 56), "video_fps": "3"}


# --- clamping ------------------------------------------------------------------------------------


def test_requested_pixels_are_clamped_into_the_server_range():
    low, high = SERVER.min_pixels, SERVER.max_pixels
    assert SERVER.pixels_for(None, None) == (low, high)
    assert SERVER.pixels_for(None, 200704) == (low, 200704)
    assert SERVER.pixels_for(None, high * 10) == (low, high)  # over the server's max: its max
    assert SERVER.pixels_for(1, None) == (low, high)  # under the server's min: its min
    assert SERVER.pixels_for(None, 10) == (low, low)  # a max under the server's min is raised to it
    assert SERVER.pixels_for(high * 2, None) == (high, high)  # a min over the server's max is lowered to it
    assert SERVER.pixels_for(100_000, 100_000) == (100_000, 100_000)


@pytest.mark.parametrize("min_pixels, max_pixels, detail, message", [
    (200_000, 100_000, None, r"min_pixels \(200000\) exceeds max_pixels \(100000\)"),
    (300_000, None, "low", rf"min_pixels \(300000\) exceeds max_pixels \({LOW_DETAIL_MAX_PIXELS}\)"),
    (0, None, None, "min_pixels must be a positive integer"),
    (None, 1.5, None, "max_pixels must be a positive integer"),
    (None, True, None, "max_pixels must be a positive integer"),
    (None, "200704", None, "max_pixels must be a positive integer"),
    (None, None, "tiny", "detail must be one of"),
])
def test_unusable_pixel_options_are_invalid_requests(min_pixels, max_pixels, detail, message):
    with pytest.raises(InvalidRequest, match=message):
        SERVER.pixels_for(min_pixels, max_pixels, detail)


def test_detail_low_is_a_small_budget_unless_max_pixels_is_set():
    assert SERVER.pixels_for(None, None, "low") == (SERVER.min_pixels, LOW_DETAIL_MAX_PIXELS)
    assert SERVER.pixels_for(None, 50_000, "low") == (SERVER.min_pixels, 50_000)
    default = SERVER.pixels_for(None, None)
    assert SERVER.pixels_for(None, None, "high") == SERVER.pixels_for(None, None, "auto") == default
    # The budget is a server setting (generator flag --low-detail-max-pixels), and clamped like the rest.
    assert dataclasses.replace(SERVER, max_pixels=100_000).pixels_for(None, None, "low")[1] == 100_000


def test_max_frames_is_clamped_to_the_server_s():
    assert SERVER.frames_for(None) == 768 and SERVER.frames_for(8) == 8 and SERVER.frames_for(10**6) == 768
    for bad in (1, 0, 2.5, "8"):
        with pytest.raises(InvalidRequest, match="max_frames"):
            SERVER.frames_for(bad)


def test_resolve_keeps_each_kind_s_own_options():
    assert SERVER.resolve({"type": "image", "max_pixels": 10**9, "fps": 4, "max_frames": 8}) == MediumOptions(
        "image", min_pixels=SERVER.min_pixels, max_pixels=SERVER.max_pixels)
    assert SERVER.resolve({"type": "video", "fps": 4, "max_frames": 8, "max_pixels": 1}) == MediumOptions(
        "video", fps=4.0, max_frames=8)
    with pytest.raises(InvalidRequest, match="unknown media kind"):
        SERVER.resolve({"type": "audio"})


# --- schema and translation ----------------------------------------------------------------------


def image_part(**image_url) -> dict:
    return {"type": "image_url", "image_url": {"url": "http://h/a.png", **image_url}}


def test_schema_takes_pixel_limits_in_image_url_or_next_to_it():
    inside = ImageURLPart.model_validate(image_part(min_pixels=3136, max_pixels=200704, detail="low"))
    beside = ImageURLPart.model_validate({**image_part(detail="low"), "min_pixels": 3136, "max_pixels": 200704})
    assert inside.options() == beside.options() == {"min_pixels": 3136, "max_pixels": 200704, "detail": "low"}
    assert ImageURLPart.model_validate(image_part()).options() == {}


@pytest.mark.parametrize("part, message", [
    ({**image_part(max_pixels=200704), "max_pixels": 100352}, "max_pixels is set both"),
    (image_part(max_pixels=0), "greater than or equal to 1"),
    (image_part(min_pixels=-5), "greater than or equal to 1"),
    (image_part(max_pixels=1.5), "valid integer"),
    (image_part(max_frames=4), "Extra inputs are not permitted"),
])
def test_schema_rejects_unusable_pixel_limits(part, message):
    with pytest.raises(ValidationError, match=message):
        ImageURLPart.model_validate(part)


def test_schema_takes_max_frames_on_video_url():
    part = VideoURLPart.model_validate({"type": "video_url", "video_url": {"url": "http://h/v.mp4", "max_frames": 8}})
    assert part.video_url.max_frames == 8
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        VideoURLPart.model_validate({"type": "video_url", "video_url": {"url": "http://h/v.mp4", "max_frames": 0}})


def test_translation_hands_the_options_to_the_vlm_model():
    request = ChatCompletionRequest.model_validate({"model": MODEL, "messages": [user([
        image_part(max_pixels=200704), image_part(detail="low"), image_part(detail="auto"),
        {"type": "video_url", "video_url": {"url": "http://h/v.mp4", "max_frames": 8}},
    ])]})
    messages, _ = to_hf_messages(request.messages)
    assert messages[0]["content"] == [{"type": "image", "max_pixels": 200704}, {"type": "image", "detail": "low"},
                                      {"type": "image"}, {"type": "video", "max_frames": 8}]


# --- the video decoding guard --------------------------------------------------------------------


def test_sampled_frames_times_frame_pixels_are_checked_before_decoding(monkeypatch):
    data = mp4_bytes(frames=12, fps=6, size=(84, 56))

    def no_decoding(*args):
        raise AssertionError("decoded a video over the limit")

    monkeypatch.setattr(media, "_decode_selected", no_decoding)
    with pytest.raises(MediaError, match=r"12 sampled frames of 84x56 = 56448 pixels, the limit is 37632"):
        decode_video(data, fps=6, max_video_pixels=8 * 84 * 56)
    monkeypatch.undo()
    assert len(decode_video(data, fps=6, max_frames=8, max_video_pixels=8 * 84 * 56).frames) == 8


# --- served --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_stack(tiny_checkpoint, tmp_path_factory):
    with running_stack(tiny_checkpoint, tmp_path_factory.mktemp("deploy-resolution"),
                       media=SERVED_MEDIA) as running:
        yield running


def prompt_tokens(stack, part: dict) -> int:
    client = openai.OpenAI(base_url=stack.proxy.base_url, api_key="unused", max_retries=0, timeout=300)
    reply = client.chat.completions.create(model=MODEL, max_tokens=1, temperature=0, messages=[
        {"role": "user", "content": [part, {"type": "text", "text": "Describe."}]}])
    return reply.usage.prompt_tokens


def image_tokens(width: int, height: int, min_pixels: int, max_pixels: int) -> int:
    resized_height, resized_width = smart_resize(height, width, FACTOR, min_pixels, max_pixels)
    return resized_height * resized_width // FACTOR**2


@pytest.mark.timeout(600)
def test_image_options_change_the_prompt_by_the_predicted_tokens(limited_stack, media_server):
    url = media_server.add("resolution-800x600.png", png_bytes(800, 600, seed=131))
    low, high = SERVER.min_pixels, SERVER.max_pixels

    def tokens(**options) -> int:
        return prompt_tokens(limited_stack, {"type": "image_url", "image_url": {"url": url, **options}})

    default = tokens()
    text = default - image_tokens(800, 600, low, high)  # the prompt's own tokens
    assert tokens(max_pixels=200704) - text == image_tokens(800, 600, low, 200704) < default - text
    # Over the server's max: clamped to it, the same prompt as without.
    assert tokens(max_pixels=high * 10) == default
    assert tokens(detail="low") - text == image_tokens(800, 600, low, LOW_DETAIL_MAX_PIXELS)
    # Next to image_url, as some clients send it.
    beside = {"type": "image_url", "image_url": {"url": url}, "max_pixels": 100352}
    assert prompt_tokens(limited_stack, beside) - text == image_tokens(800, 600, low, 100352)
    with pytest.raises(openai.BadRequestError, match=r"min_pixels \(300000\) exceeds max_pixels \(200000\)"):
        tokens(min_pixels=300_000, max_pixels=200_000)


@pytest.mark.timeout(600)
def test_min_pixels_enlarges_a_small_image_down_to_the_server_s_min(limited_stack, media_server):
    url = media_server.add("resolution-56x56.png", png_bytes(56, 56, seed=132))

    def tokens(**options) -> int:
        return prompt_tokens(limited_stack, {"type": "image_url", "image_url": {"url": url, **options}})

    default = tokens()
    text = default - image_tokens(56, 56, SERVER.min_pixels, SERVER.max_pixels)
    assert tokens(min_pixels=1) == default  # under the server's min: its min
    assert tokens(min_pixels=112 * 112) - text == image_tokens(56, 56, 112 * 112, SERVER.max_pixels) > default - text


@pytest.mark.timeout(600)
def test_max_frames_limits_the_frames_and_the_decoded_size_is_bounded(limited_stack, media_server):
    url = media_server.add("resolution-12-frames.mp4", mp4_bytes(frames=12, fps=6, size=(84, 56)))

    def tokens(**options) -> int:
        return prompt_tokens(limited_stack, {"type": "video_url", "video_url": {"url": url, "fps": 6, **options}})

    # At 6 fps all 12 frames are sampled: over the served max_video_pixels, a 400 before decoding.
    with pytest.raises(openai.BadRequestError, match=r"12 sampled frames of 84x56 = 56448 pixels, the limit is 37632"):
        tokens()
    height, width = smart_resize(56, 84, FACTOR, SERVER.video_min_pixels, SERVER.video_max_pixels)
    per_pair = height * width // FACTOR**2  # two frames make one temporal patch
    assert tokens(max_frames=8) - tokens(max_frames=4) == (8 - 4) // 2 * per_pair
    assert tokens(max_frames=9) == tokens(max_frames=8)  # sampled counts are even


@pytest.mark.timeout(600)
def test_the_repository_s_video_fps_applies_to_videos_that_set_none(limited_stack, media_server):
    url = media_server.add("resolution-fps.mp4", mp4_bytes(frames=12, fps=6, size=(84, 56)))

    def tokens(**options) -> int:
        return prompt_tokens(limited_stack, {"type": "video_url", "video_url": {"url": url, **options}})

    # 2 s of video: 6 frames at the repository's 3 fps; 4 (the least sampled) at the usual default of 2.
    assert tokens() == tokens(fps=3) > tokens(fps=2)
