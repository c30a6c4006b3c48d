"""Chat messages -> prompt token ids, with one pad token per vision embedding, as Qwen2-VL's processor does."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlmserve.errors import InvalidRequest

ROLES = ("system", "user", "assistant")


def media_parts(messages: Sequence[dict]) -> list[dict]:
    """The image/video parts of all messages, in prompt order (the order of the MEDIA input)."""
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts.extend(p for p in content if p.get("type") in ("image", "video"))
    return parts


def validate_messages(messages: object) -> list[dict]:
    """Check the HF chat-template form the `vlm` model accepts; raise InvalidRequest otherwise."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InvalidRequest(f"messages[{i}]: role must be one of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise InvalidRequest(f"messages[{i}].content must be a string or a list of parts")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind in ("image", "video"):
                if message["role"] != "user":
                    raise InvalidRequest(f"messages[{i}]: only user messages may carry images or videos")
                continue
            raise InvalidRequest(f"messages[{i}].content[{j}]: unsupported part {kind!r}")
    return messages


class PromptBuilder:
    """Renders messages with the checkpoint's chat template and expands vision pad tokens."""

    def __init__(self, tokenizer, image_token_id: int, video_token_id: int, spatial_merge_size: int) -> None:
        self.tokenizer = tokenizer
        self.pad_ids = {"image": image_token_id, "video": video_token_id}
        self.merge_unit = spatial_merge_size**2

    def build(self, messages: list[dict], grids: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
        """Token ids for `messages`; `grids` holds (kind, grid_thw) for each media part in prompt order."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        counts = iter(int(np.prod(grid)) // self.merge_unit for _, grid in grids)
        kinds = iter(kind for kind, _ in grids)
        pad_to_kind = {v: k for k, v in self.pad_ids.items()}
        out: list[int] = []
        for token in ids:
            kind = pad_to_kind.get(token)
            if kind is None:
                out.append(token)
                continue
            expected = next(kinds, None)
            if expected != kind:
                raise InvalidRequest("the media inputs do not match the image/video parts of the messages")
            out.extend([token] * next(counts))
        if next(kinds, None) is not None:
            raise InvalidRequest("more media inputs than image/video parts in the messages")
        return np.asarray(out, dtype=np.int64)

    def raw(self, prompt: str) -> np.ndarray:
        """Token ids of a plain-text prompt (OpenAI text completions): no chat template, no media."""
        ids = np.asarray(self.tokenizer(prompt)["input_ids"], dtype=np.int64)
        if np.isin(ids, list(self.pad_ids.values())).any():
            raise InvalidRequest("a text prompt cannot hold image or video pad tokens")
        return ids
