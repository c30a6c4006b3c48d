"""OpenAI chat completions (`/v1/chat/completions`): request and response models."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from openai_proxy.schemas import MAX_LOGPROBS, GenerationRequest, StrictModel, StructuredOutputs, Usage

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


class FunctionCall(StrictModel):
    name: str = Field(min_length=1)
    arguments: str  # JSON text, as the model wrote it (in an answer cut off by max_tokens, not complete)


class ToolCall(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SentFunctionCall(FunctionCall):
    """A call of an earlier turn, which goes back into the prompt: its arguments must parse."""

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        try:
            if isinstance(json.loads(arguments), dict):
                return arguments
        except ValueError:
            pass
        raise ValueError("tool call arguments must be a JSON object")


class SentToolCall(ToolCall):
    function: SentFunctionCall


class AssistantMessage(StrictModel):
    role: Literal["assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)] | None = None
    name: str | None = None
    tool_calls: list[SentToolCall] | None = None
    # What clients copy back from an earlier response; only empty values make sense here.
    refusal: None = None
    function_call: None = None
    audio: None = None

    @model_validator(mode="after")
    def _says_something(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(StrictModel):
    role: Literal["tool"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    tool_call_id: str


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class FunctionDefinition(StrictModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema; none: no arguments
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class TextResponseFormat(StrictModel):
    type: Literal["text"]


class JSONObjectResponseFormat(StrictModel):
    type: Literal["json_object"]


class JSONSchema(StrictModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class JSONSchemaResponseFormat(StrictModel):
    type: Literal["json_schema"]
    json_schema: JSONSchema


ResponseFormat = Annotated[TextResponseFormat | JSONObjectResponseFormat | JSONSchemaResponseFormat,
                          Field(discriminator="type")]


class ChatCompletionRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    # Accepted and ignored: they change nothing in the answer.
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    prompt_cache_key: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    safety_identifier: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    moderation: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: one call at most (tool_choice "required" makes exactly one)
    response_format: ResponseFormat | None = None
    # Refused unless they ask for nothing (see GenerationRequest.NEUTRAL).
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None

    NEUTRAL: ClassVar[dict[str, tuple[tuple, str]]] = {
        **GenerationRequest.NEUTRAL,
        "functions": ((None, []), "functions are deprecated; send tools"),
        "function_call": ((None, "none"), "function_call is deprecated; send tool_choice"),
        "modalities": ((None, ["text"]), "only text output is supported"),
        "audio": ((None,), "audio output is not supported"),
        "prediction": ((None,), "predicted outputs are not supported"),
        "web_search_options": ((None,), "web search is not supported"),
    }

    @model_validator(mode="after")
    def _options_agree(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools has two functions of the same name")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names the function {self.tool_choice.function.name!r}, "
                             f"which is not among the tools")
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        constraints = [self.structured_outputs is not None,
                       self.response_format is not None and self.response_format.type != "text",
                       self.forced_tools]
        if sum(constraints) > 1:
            raise ValueError("only one of response_format, structured_outputs and a forced tool_choice may "
                             "constrain the output")
        return self

    @property
    def tool_mode(self) -> str:
        """How the answer may call tools: "none", "auto", "required" or "named"."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    @property
    def forced_tools(self) -> bool:
        return self.tool_mode in ("named", "required")

    def output_constraint(self) -> StructuredOutputs | None:
        """What the output must match: the response format's, or the extension's (forced tool calls: see tools)."""
        if self.structured_outputs is not None:
            return self.structured_outputs
        if isinstance(self.response_format, JSONObjectResponseFormat):
            return StructuredOutputs(json_object=True)
        if isinstance(self.response_format, JSONSchemaResponseFormat):
            return StructuredOutputs(json=self.response_format.json_schema.schema_ or {"type": "object"})
        return None


# --- responses -----------------------------------------------------------------------------------


def _is_none(value: object) -> bool:
    return value is None


class TopLogprob(BaseModel):
    token: str
    bytes: list[int]
    logprob: float


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantReply(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=_is_none)


class Choice(BaseModel):
    index: int = 0
    message: AssistantReply
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = Field(None, exclude_if=_is_none)
    arguments: str


class ToolCallDelta(BaseModel):
    # The first delta of a call has its id, type and name; later ones only more of the arguments.
    index: int
    id: str | None = Field(None, exclude_if=_is_none)
    type: Literal["function"] | None = Field(None, exclude_if=_is_none)
    function: FunctionCallDelta


class Delta(BaseModel):
    # OpenAI sends only the keys that changed: the role once, then content or tool calls.
    role: Literal["assistant"] | None = Field(None, exclude_if=_is_none)
    content: str | None = Field(None, exclude_if=_is_none)
    tool_calls: list[ToolCallDelta] | None = Field(None, exclude_if=_is_none)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # set on the extra last chunk when stream_options.include_usage
