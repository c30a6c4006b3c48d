"""What the engine generates from: prompt ids with each medium's embeddings, and the sampling options."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vlmserve.errors import InvalidRequest


@dataclass(frozen=True)
class MediaInput:
    """One image or video of a prompt, already through the ViT."""

    kind: str  # "image" | "video"
    key: str  # content key: the prefix cache matches the medium by it
    grid_thw: np.ndarray  # int64 [3], the preprocessor's patch grid
    embeds: np.ndarray  # float32 [tokens, hidden]


@dataclass(frozen=True)
class EngineRequest:
    prompt_ids: np.ndarray  # int64 [n]: the prompt with each medium's pad token repeated once per embedding row
    sampling: dict  # vlmserve.sampling_options names, the server's defaults and max_tokens filled in
    media: list[MediaInput] = field(default_factory=list)  # in prompt order


def media_runs(input_ids: np.ndarray, media_token_ids: tuple[int, int]) -> list[tuple[int, int]]:
    """(start, length) of each run of image/video pad tokens: one run per medium in a Qwen2-VL prompt."""
    positions = np.flatnonzero(np.isin(input_ids, media_token_ids))
    if positions.size == 0:
        return []
    starts = positions[np.flatnonzero(np.diff(positions, prepend=-2) != 1)]
    ends = positions[np.flatnonzero(np.diff(positions, append=positions[-1] + 2) != 1)]
    return [(int(s), int(e - s + 1)) for s, e in zip(starts, ends)]


def check_media(request: EngineRequest, media_token_ids: tuple[int, int]) -> list[tuple[int, int]]:
    """The pad-token runs of the prompt, after checking that they agree with the media one to one."""
    runs = media_runs(request.prompt_ids, media_token_ids)
    if len(runs) != len(request.media):
        raise InvalidRequest(f"{len(runs)} runs of image/video pad tokens but {len(request.media)} media")
    image_token_id, _ = media_token_ids
    for (start, length), medium in zip(runs, request.media):
        kind = "image" if request.prompt_ids[start] == image_token_id else "video"
        if kind != medium.kind:
            raise InvalidRequest(f"a run of {kind} pad tokens carries a {medium.kind}")
        if len(medium.embeds) != length:
            raise InvalidRequest(f"{length} {kind} pad tokens but {len(medium.embeds)} embedding rows")
    return runs
