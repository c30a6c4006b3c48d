"""OpenAI requests -> what the Triton `vlm` model takes: HF chat-template messages, media URLs, sampling."""

from __future__ import annotations

from collections.abc import Sequence

from openai_proxy.chat_schemas import (
    AssistantMessage,
    ImageURLPart,
    Message,
    SystemMessage,
    TextPart,
    Tool,
    ToolMessage,
    VideoURLPart,
)
from openai_proxy.schemas import GenerationRequest, StructuredOutputs
from openai_proxy.tools import call_text, response_text, with_tools_prompt
from vlmserve.sampling_options import OPTIONS


def _text(content: str | list[TextPart] | None) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content or [])


def _tool_turn(message: Message, previous: dict | None) -> dict | None:
    """The HF form of an assistant turn with tool calls or of a tool result (None for other messages).
    Consecutive tool results share one user turn, as Qwen's template puts them."""
    if isinstance(message, ToolMessage):
        text = response_text(_text(message.content))
        if previous is not None and previous.get("tool_results"):
            previous["content"] += "\n" + text
            return previous
        return {"role": "user", "content": text, "tool_results": True}
    if isinstance(message, AssistantMessage) and message.tool_calls:
        parts = [_text(message.content)] if message.content else []
        return {"role": "assistant", "content": "\n".join([*parts, *map(call_text, message.tool_calls)])}
    return None


def to_hf_messages(messages: Sequence[Message], tools: list[Tool] | None = None) -> tuple[list[dict], list[str]]:
    """HF-form messages and the URLs of their images/videos, in the order the parts appear.

    Images and videos are replaced by placeholders (`{"type": "image"}`, with the part's own
    resolution options, which the `vlm` model resolves); their bytes travel apart, in the MEDIA
    input, in the same order. A part's own options go along only when set: the server's settings apply to
    the rest. `tools`, if given, are described in the system message.
    """
    hf_messages, urls = [], []
    for message in messages:
        role = "system" if isinstance(message, SystemMessage) else message.role
        turn = _tool_turn(message, hf_messages[-1] if hf_messages else None)
        if turn is not None:
            if turn is not (hf_messages[-1] if hf_messages else None):
                hf_messages.append(turn)
            continue
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
                options = {"fps": part.video_url.fps, "max_frames": part.video_url.max_frames}
                content.append({"type": "video", **{k: v for k, v in options.items() if v is not None}})
                urls.append(part.video_url.url)
        hf_messages.append({"role": role, "content": content})
    for message in hf_messages:
        message.pop("tool_results", None)
    return (with_tools_prompt(hf_messages, tools) if tools else hf_messages), urls


def sampling_params(request: GenerationRequest, max_tokens: int | None, logprobs: int | None = None,
                    constraint: StructuredOutputs | None = None) -> dict:
    """The `sampling` object of the Triton request: the options the client set, under the server's names
    (vlmserve.sampling_options); the server's defaults apply to the rest. Those whose request form differs
    come as arguments: `logprobs`, how many top tokens to return the logprobs of (0: only the sampled ones')."""
    sampling = {name: getattr(request, name) for name in OPTIONS
                if name in type(request).model_fields and getattr(request, name) is not None}
    overrides = {"max_tokens": max_tokens, "stop": request.stop_list(), "logprobs": logprobs,
                 "structured_outputs": None if constraint is None else constraint.engine_form()}
    sampling.update(overrides)
    return {name: value for name, value in sampling.items() if value is not None}


def choice_sampling(sampling: dict, index: int) -> dict:
    """Choice `index` of n: with a seed, each choice draws from its own (else all n would be the same)."""
    if index and sampling.get("seed") is not None:
        return {**sampling, "seed": (sampling["seed"] + index) % 2**63}
    return sampling
