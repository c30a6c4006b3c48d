"""OpenAI (legacy) text completions (`/v1/completions`): request and response models."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator

from openai_proxy.schemas import GenerationRequest, Usage

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this API


class CompletionRequest(GenerationRequest):
    prompt: str
    max_tokens: int | None = Field(None, ge=1)
    # Refused unless they ask for nothing (see GenerationRequest.NEUTRAL).
    echo: Any = None
    logprobs: Any = None
    suffix: Any = None
    best_of: Any = None

    NEUTRAL: ClassVar[dict[str, tuple[tuple, str]]] = {
        **GenerationRequest.NEUTRAL,
        "echo": ((None, False), "echo is not supported by this server"),
        "logprobs": ((None,), "logprobs are not supported by this server"),
        "suffix": ((None, ""), "suffix is not supported by this server"),
        "best_of": ((None, 1), "only best_of=1 is supported"),
    }

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt_string(cls, prompt: Any) -> Any:
        if isinstance(prompt, list):
            if len(prompt) == 1 and isinstance(prompt[0], str):
                return prompt[0]
            raise ValueError("prompt must be a string or a list of one string; "
                             "several prompts and token id prompts are not supported")
        return prompt


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class TextCompletion(BaseModel):
    """Both the whole answer and, when streamed, each chunk (OpenAI uses one object type for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
