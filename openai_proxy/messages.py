"""OpenAI requests -> what the Triton `vlm` model takes: HF chat-template messages, media URLs, sampling."""

from __future__ import annotations

from collections.abc import Sequence

from openai_proxy.chat_schemas import ImageURLPart, Message, SystemMessage, TextPart, VideoURLPart
from openai_proxy.schemas import GenerationRequest

# Request fields passed to the model under the same name when the client sets them.
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
                    "repetition_penalty", "seed")


def to_hf_messages(messages: Sequence[Message], default_video_fps: float) -> tuple[list[dict], list[str]]:
    """HF-form messages and the URLs of their images/videos, in the order the parts appear.

    Images and videos are replaced by placeholders (`{"type": "image"}`, with the part's own
    resolution options, which the `vlm` model resolves); their bytes travel apart, in the MEDIA
    input, in the same order.
    """
    hf_messages, urls = [], []
    for message in messages:
        role = "system" if isinstance(message, SystemMessage) else message.role
        if isinstance(message.content, str):
            hf_messages.append({"role": role, "content": message.content})
            continue
        content = []
        for part in message.content:
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": part.text})
            elif isinstance(part, ImageURLPart):
                content.append({"type": "image", **part.options()})
                urls.append(part.image_url.url)
            elif isinstance(part, VideoURLPart):
                video = {"type": "video", "fps": part.video_url.fps or default_video_fps}
                if part.video_url.max_frames is not None:
                    video["max_frames"] = part.video_url.max_frames
                content.append(video)
                urls.append(part.video_url.url)
        hf_messages.append({"role": role, "content": content})
    return hf_messages, urls


def sampling_params(request: GenerationRequest, max_tokens: int) -> dict:
    """The `sampling` object of the Triton request; unset options are left to the model's defaults."""
    sampling = {name: getattr(request, name) for name in _SAMPLING_FIELDS if getattr(request, name) is not None}
    sampling["max_tokens"] = max_tokens
    if request.stop is not None:
        sampling["stop"] = request.stop_list()
    return sampling
