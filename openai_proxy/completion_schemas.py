"""OpenAI (legacy) text completions (`/v1/completions`): request and response models."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from openai_proxy.schemas import MAX_LOGPROBS, GenerationRequest, Usage

class CompletionRequest(GenerationRequest):
    prompt: str
    max_tokens: int = Field(16, ge=1)  # OpenAI's default for this API (and vLLM's)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # top tokens per position
    # Refused unless they ask for nothing (see GenerationRequest.NEUTRAL).
    suffix: Any = None
    best_of: Any = None

    NEUTRAL: ClassVar[dict[str, tuple[tuple, str]]] = {
        **GenerationRequest.NEUTRAL,
        "suffix": ((None, ""), "suffix is not supported by this server"),
        "best_of": ((None, 1), "only best_of=1 is supported"),
    }

    @model_validator(mode="after")
    def _echo_without_logprobs(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported (it would need the prompt's logprobs)")
        return self

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt_string(cls, prompt: Any) -> Any:
        if isinstance(prompt, list):
            if len(prompt) == 1 and isinstance(prompt[0], str):
                return prompt[0]
            raise ValueError("prompt must be a string or a list of one string; "
                             "several prompts and token id prompts are not supported")
        return prompt


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class TextCompletion(BaseModel):
    """Both the whole answer and, when streamed, each chunk (OpenAI uses one object type for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
