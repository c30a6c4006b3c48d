"""The typed request the `vlm` model hands the `llm` model, and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vlmserve.errors import InvalidRequest


@dataclass(frozen=True)
class MediaInput:
    """One image or video of a prompt, already through the ViT."""

    kind: str  # "image" | "video"
    key: str  # content key: prefix caches match the medium by it
    grid_thw: np.ndarray  # int64 [3], the preprocessor's patch grid
    embeds: np.ndarray  # float32 [tokens, hidden]


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    input_ids: np.ndarray  # int64 [n]: the chat prompt with each medium's pad token repeated once per embedding row
    sampling: dict  # the request's sampling options (vlmserve.sampling_options), stop strings excluded
    media: list[MediaInput] = field(default_factory=list)  # in prompt order


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities of n sampled tokens, and of the k most likely tokens at each of those steps."""

    logprobs: np.ndarray  # float32 [n]
    top_ids: np.ndarray  # int64 [n, k]
    top_logprobs: np.ndarray  # float32 [n, k]

    @staticmethod
    def concat(parts: list[TokenLogprobs]) -> TokenLogprobs:
        return TokenLogprobs(*(np.concatenate([getattr(p, name) for p in parts])
                               for name in ("logprobs", "top_ids", "top_logprobs")))


@dataclass(frozen=True)
class TokenChunk:
    """New tokens of one request; several tokens when they were ready together."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" once finished
    error: Exception | None = None  # the request failed; nothing follows
    logprobs: TokenLogprobs | None = None  # of token_ids, when the request asked for them
    cached_tokens: int | None = None  # on a request's first chunk: prompt tokens the prefix cache served

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def then(self, later: TokenChunk) -> TokenChunk:
        """This chunk followed by a later one of the same request, as one."""
        logprobs = [lp for lp in (self.logprobs, later.logprobs) if lp is not None]
        return TokenChunk(self.request_id, self.token_ids + later.token_ids, later.finish_reason, later.error,
                          TokenLogprobs.concat(logprobs) if logprobs else None,
                          self.cached_tokens if self.cached_tokens is not None else later.cached_tokens)


def media_runs(input_ids: np.ndarray, media_token_ids: tuple[int, int]) -> list[tuple[int, int]]:
    """(start, length) of each run of image/video pad tokens: one run per medium in a Qwen2-VL prompt."""
    positions = np.flatnonzero(np.isin(input_ids, media_token_ids))
    if positions.size == 0:
        return []
    starts = positions[np.flatnonzero(np.diff(positions, prepend=-2) != 1)]
    ends = positions[np.flatnonzero(np.diff(positions, append=positions[-1] + 2) != 1)]
    return [(int(s), int(e - s + 1)) for s, e in zip(starts, ends)]


def split_media(input_ids: np.ndarray, embeds: np.ndarray | None, keys: list[str], grids: np.ndarray | None,
                media_token_ids: tuple[int, int]) -> list[MediaInput]:
    """The media of a prompt from their transport form: embedding rows of every medium concatenated in
    prompt order, one content key and one grid per medium."""
    runs = media_runs(input_ids, media_token_ids)
    rows = 0 if embeds is None else len(embeds)
    if sum(length for _, length in runs) != rows:
        raise InvalidRequest(f"{sum(n for _, n in runs)} image/video pad tokens but {rows} media embedding rows")
    grids = np.zeros((0, 3), np.int64) if grids is None else np.asarray(grids, np.int64).reshape(-1, 3)
    if not len(runs) == len(keys) == len(grids):
        raise InvalidRequest(f"{len(runs)} media in the prompt but {len(keys)} keys and {len(grids)} grids")
    media, row = [], 0
    for (start, length), key, grid in zip(runs, keys, grids):
        kind = "image" if input_ids[start] == media_token_ids[0] else "video"
        media.append(MediaInput(kind, key, grid, embeds[row : row + length]))
        row += length
    return media


def check_media(request: GenerationRequest, media_token_ids: tuple[int, int]) -> list[tuple[int, int]]:
    """The pad-token runs of the prompt, after checking that they agree with the media one to one."""
    runs = media_runs(request.input_ids, media_token_ids)
    if len(runs) != len(request.media):
        raise InvalidRequest(f"{len(runs)} runs of image/video pad tokens but {len(request.media)} media")
    image_token_id, _ = media_token_ids
    for (start, length), medium in zip(runs, request.media):
        kind = "image" if request.input_ids[start] == image_token_id else "video"
        if kind != medium.kind:
            raise InvalidRequest(f"a run of {kind} pad tokens carries a {medium.kind}")
        if len(medium.embeds) != length:
            raise InvalidRequest(f"{length} {kind} pad tokens but {len(medium.embeds)} embedding rows")
    return runs
