"""The `vlm` model's REQUEST input (JSON) as a typed request, checked before any work."""

from __future__ import annotations

import json
from dataclasses import dataclass

from vlmserve.errors import InvalidRequest
from vlmserve.inputs.prompt import validate_messages
from vlmserve.sampling_options import check_options


@dataclass(frozen=True)
class ClientRequest:
    """Chat messages (HF chat-template form) or a plain-text prompt (text completions), and sampling options."""

    messages: list[dict] | None
    prompt: str | None
    sampling: dict  # as the client set them, checked for names and types


def parse_request(raw: bytes | str, media_count: int) -> ClientRequest:
    """The request in `raw`, which comes with `media_count` media inputs; InvalidRequest if it is malformed."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"REQUEST is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("REQUEST must be a JSON object")
    sampling = check_options(body.get("sampling") or {})
    if "prompt" in body:
        if media_count or "messages" in body:
            raise InvalidRequest("a request with a prompt takes neither messages nor media")
        if not isinstance(body["prompt"], str) or not body["prompt"]:
            raise InvalidRequest("prompt must be a non-empty string")
        return ClientRequest(None, body["prompt"], sampling)
    return ClientRequest(validate_messages(body.get("messages")), None, sampling)
