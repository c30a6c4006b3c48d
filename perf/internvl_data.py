"""Conversations in the InternVL-Chat-V1-2-SFT-Data JSONL format, and the OpenAI messages they become.

One JSON object a line: {"id", "image": str | list[str] (optional), "conversations": [{"from":
"human" | "gpt", "value": "<image>\\n..."}, ...]}. Image paths are relative to an image root.
Each `<image>` in a human turn stands for the next image of the list, in order; a conversation with
images but no `<image>` tag gets them all at the start of its first turn (as InternVL's loader does).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE_TAG = "<image>"


@dataclass(frozen=True)
class Round:
    human: str  # may hold `<image>` tags
    gpt: str


@dataclass(frozen=True)
class Conversation:
    id: str
    images: tuple[str, ...]
    rounds: tuple[Round, ...]


def parse_conversation(obj: dict) -> Conversation:
    """One JSONL record; raises ValueError when turns do not alternate human/gpt or tags outnumber images."""
    image = obj.get("image") or []
    images = (image,) if isinstance(image, str) else tuple(image)
    turns = obj["conversations"]
    if len(turns) % 2 or not turns:
        raise ValueError(f"conversation {obj.get('id')}: expected human/gpt pairs, got {len(turns)} turns")
    rounds = []
    for human, gpt in zip(turns[::2], turns[1::2], strict=True):
        if human["from"] != "human" or gpt["from"] != "gpt":
            raise ValueError(f"conversation {obj.get('id')}: turns must alternate human, gpt")
        rounds.append(Round(human["value"], gpt["value"]))
    tags = sum(r.human.count(IMAGE_TAG) for r in rounds)
    if tags > len(images):
        raise ValueError(f"conversation {obj.get('id')}: {tags} {IMAGE_TAG} tags for {len(images)} images")
    return Conversation(str(obj.get("id", "")), images, tuple(rounds))


def load_jsonl(path: Path) -> Iterator[Conversation]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield parse_conversation(json.loads(line))


def write_jsonl(path: Path, conversations: Iterable[Conversation]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for c in conversations:
            turns = [turn for r in c.rounds
                     for turn in ({"from": "human", "value": r.human}, {"from": "gpt", "value": r.gpt})]
            image: str | list[str] = c.images[0] if len(c.images) == 1 else list(c.images)
            f.write(json.dumps({"id": c.id, "image": image, "conversations": turns}, ensure_ascii=False) + "\n")


def user_contents(conversation: Conversation, image_url: Callable[[str], str]) -> list[list[dict]]:
    """The OpenAI `content` list of each human turn: text and image_url parts in the order the tags give."""
    pending = iter(conversation.images)
    untagged = not any(IMAGE_TAG in r.human for r in conversation.rounds)
    contents = []
    for index, round_ in enumerate(conversation.rounds):
        parts: list[dict] = []
        if untagged and index == 0:
            parts += [_image_part(image_url(path)) for path in pending]
        pieces = round_.human.split(IMAGE_TAG)
        for position, piece in enumerate(pieces):
            if position > 0:
                parts.append(_image_part(image_url(next(pending))))
                piece = piece.removeprefix("\n")  # the tag's own line break
            if piece.strip():
                parts.append({"type": "text", "text": piece})
        contents.append(parts)
    return contents


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}
