"""What chat and text completion requests share, as pydantic models, plus usage and the model list.

Like OpenAI, requests with unknown fields are rejected. Fields of OpenAI's API that this server
cannot honour (logit_bias, audio, ...) are accepted only with a value that asks for nothing, so that
a client relying on them gets a clear 400 instead of a silently different answer.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(StrictModel):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # accepted; chunks carry no obfuscation padding


MAX_LOGPROBS = 20  # top logprobs per token, as OpenAI and vLLM's default max_logprobs allow
MAX_CHOICES = 16  # n: each choice is one generation in the engine


class StructuredOutputs(StrictModel):
    """vLLM's structured-output extension (`extra_body={"structured_outputs": {...}}`): one constraint."""

    json_: dict | str | None = Field(None, alias="json")  # a JSON schema
    regex: str | None = Field(None, min_length=1)
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, min_length=1)
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        if len(self.engine_form()) != 1:
            raise ValueError("structured_outputs takes exactly one of json, regex, choice, grammar, json_object")
        return self

    def engine_form(self) -> dict:
        return self.model_dump(exclude_none=True, by_alias=True)


class GenerationRequest(StrictModel):
    """Sampling and streaming options of both completion APIs."""

    model: str
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    # Extensions, as vLLM takes them (the openai client sends them in `extra_body`).
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    user: str | None = None  # accepted and ignored
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    # vLLM's extensions: no end of sequence before min_tokens; never stop at it; a constrained output.
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    structured_outputs: StructuredOutputs | None = None
    logit_bias: Any = None

    # Field -> (values that ask for nothing, why other values are refused). Subclasses extend it.
    NEUTRAL: ClassVar[dict[str, tuple[tuple, str]]] = {
        "logit_bias": ((None, {}), "logit_bias is not supported by this server"),
    }

    @field_validator("*")
    @classmethod
    def _unsupported_fields_ask_for_nothing(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name in cls.NEUTRAL:
            neutral, reason = cls.NEUTRAL[info.field_name]
            if value not in neutral:
                raise ValueError(reason)
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k_off_is_zero(cls, top_k: int | None) -> int | None:
        return 0 if top_k == -1 else top_k  # vLLM spells "off" -1; the engine, 0

    @field_validator("stop")
    @classmethod
    def _up_to_four_stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or not all(stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stop

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlmserve"
    max_model_len: int | None = None  # the context length, as vLLM's server reports it


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
