"""OpenAI chat completions (`/v1/chat/completions`): request and response models."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from openai_proxy.schemas import GenerationRequest, StrictModel, Usage

# --- request -------------------------------------------------------------------------------------


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ImageURL(StrictModel):
    url: str = Field(min_length=1)
    # "low": a small pixel budget unless max_pixels is set; the others: the server's limits.
    detail: Literal["auto", "low", "high", "original"] = "auto"
    # As DashInfer-VLM and vLLM users send them; the server clamps them into its own limits.
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)


class ImageURLPart(StrictModel):
    type: Literal["image_url"]
    image_url: ImageURL
    # The same limits next to image_url, as some clients put them.
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _limits_set_once(self) -> ImageURLPart:
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None and getattr(self.image_url, name) is not None:
                raise ValueError(f"{name} is set both in image_url and next to it")
        return self

    def options(self) -> dict[str, int | str]:
        """The resolution options this part sets, as the `vlm` model's image part takes them."""
        options: dict[str, int | str] = {}
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self.image_url, name) or getattr(self, name)
            if value is not None:
                options[name] = value
        if self.image_url.detail != "auto":
            options["detail"] = self.image_url.detail
        return options


class VideoURL(StrictModel):
    url: str = Field(min_length=1)
    fps: float | None = Field(None, gt=0, le=60)
    max_frames: int | None = Field(None, ge=1)  # the server clamps it to its own max_frames


class VideoURLPart(StrictModel):
    type: Literal["video_url"]
    video_url: VideoURL


UserPart = Annotated[TextPart | ImageURLPart | VideoURLPart, Field(discriminator="type")]


class SystemMessage(StrictModel):
    role: Literal["system", "developer"]  # "developer" is OpenAI's newer name for system
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None


class UserMessage(StrictModel):
    role: Literal["user"]
    content: str | Annotated[list[UserPart], Field(min_length=1)]
    name: str | None = None


class AssistantMessage(StrictModel):
    role: Literal["assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None
    # What clients copy back from an earlier response; only empty values make sense here.
    refusal: None = None
    tool_calls: Annotated[list[Any], Field(max_length=0)] | None = None
    function_call: None = None
    audio: None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]


class ChatCompletionRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    # Accepted and ignored: they change nothing in the answer.
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None
    prompt_cache_key: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    safety_identifier: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    moderation: Any = None
    # Refused unless they ask for nothing (see GenerationRequest.NEUTRAL).
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None

    NEUTRAL: ClassVar[dict[str, tuple[tuple, str]]] = {
        **GenerationRequest.NEUTRAL,
        "logprobs": ((None, False), "logprobs are not supported by this server"),
        "top_logprobs": ((None,), "top_logprobs is not supported by this server (it returns no logprobs)"),
        "tools": ((None, []), "tools are not supported by this server"),
        "tool_choice": ((None, "none"), "tools are not supported by this server"),
        "functions": ((None, []), "functions are not supported by this server"),
        "function_call": ((None, "none"), "functions are not supported by this server"),
        "response_format": ((None, {"type": "text"}), "only the text response_format is supported"),
        "modalities": ((None, ["text"]), "only text output is supported"),
        "audio": ((None,), "audio output is not supported"),
        "prediction": ((None,), "predicted outputs are not supported"),
        "web_search_options": ((None,), "web search is not supported"),
    }


# --- responses -----------------------------------------------------------------------------------


class AssistantReply(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantReply
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


def _is_none(value: object) -> bool:
    return value is None


class Delta(BaseModel):
    # OpenAI sends only the keys that changed: the role once, then content.
    role: Literal["assistant"] | None = Field(None, exclude_if=_is_none)
    content: str | None = Field(None, exclude_if=_is_none)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # set on the extra last chunk when stream_options.include_usage
