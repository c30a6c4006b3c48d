"""Where the media encoder's vision work runs: the two steps it needs of a vision backend.

`prepare` learns a medium's grid_thw (which fixes its share of the prompt, so the request can be admitted
before any ViT work); `encode` turns prepared media into embeddings. `LocalVision` does both with the
`preprocess` and `vit` models of the same tritonserver (BLS calls); `vlmserve.media.remote_vision` sends the
work to a pool of ViT servers over gRPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vlmserve.contracts import PREPROCESS, VIT
from vlmserve.media.settings import MediumOptions
from vlmserve.vit.packing import pack_vit_calls, split_embeddings

# One call of a model: (model name, inputs by name, output names) -> outputs by name; InvalidRequest for the
# client's mistakes (bad media).
Infer = Callable[[str, Mapping[str, np.ndarray], list[str]], Awaitable[dict[str, np.ndarray]]]


@dataclass(frozen=True)
class Medium:
    options: MediumOptions
    data: bytes
    # The most LLM tokens the medium may become (the context its request leaves it): a backend that learns
    # the grid only by encoding checks it before its ViT work. None: no limit known.
    token_budget: int | None = None


@dataclass(frozen=True)
class Encoded:
    key: str  # content hash + everything that shapes the ViT input (MediaSettings.cache_key)
    grid_thw: np.ndarray  # int64 [3]
    embeds: np.ndarray  # [tokens, hidden]


@dataclass(frozen=True)
class Prepared:
    """A medium whose grid is known, not yet in the cache: `payload` is what the backend's `encode` takes it
    from (pixel values for LocalVision; for a remote one the medium, or the embeddings themselves where the
    grid could not be had without them)."""

    grid_thw: np.ndarray
    payload: object


class VisionBackend(Protocol):
    async def prepare(self, medium: Medium) -> Prepared:
        """The medium's grid; InvalidRequest for media the user got wrong."""

    async def encode(self, prepared: list[Prepared]) -> list[np.ndarray]:
        """The embeddings of each prepared medium, in order."""


def options_inputs(medium: Medium) -> dict[str, np.ndarray]:
    """A medium and its resolved options as the inputs of `preprocess` (and of a ViT server's `encode`, which
    also takes the budget)."""
    inputs = {PREPROCESS.MEDIA.name: np.asarray([medium.data], dtype=np.object_),
              PREPROCESS.KIND.name: np.asarray([medium.options.kind], dtype=np.object_)}
    for name, spec in PREPROCESS.OPTIONS.items():
        value = getattr(medium.options, name)
        if value is not None:
            inputs[spec.name] = np.asarray([value], dtype=spec.numpy_dtype)
    return inputs


class LocalVision:
    """`preprocess` then `vit`, the media of one request packed into as few `vit` calls as the patch budget
    allows (vlmserve.vit.packing), those calls run concurrently."""

    def __init__(self, infer: Infer, merge_size: int, max_patches: int) -> None:
        self.infer = infer
        self.merge_size = merge_size
        self.max_patches = max_patches

    async def prepare(self, medium: Medium) -> Prepared:
        out = await self.infer(PREPROCESS.NAME, options_inputs(medium),
                               [PREPROCESS.PIXEL_VALUES.name, PREPROCESS.GRID_THW.name])
        return Prepared(out[PREPROCESS.GRID_THW.name].reshape(3), out[PREPROCESS.PIXEL_VALUES.name])

    async def encode(self, prepared: list[Prepared]) -> list[np.ndarray]:
        grids = [p.grid_thw for p in prepared]
        calls = pack_vit_calls([p.payload for p in prepared], grids, self.merge_size, self.max_patches)
        outputs = await asyncio.gather(*(self.infer(VIT.NAME, call, [VIT.IMAGE_EMBEDS.name]) for call in calls))
        return split_embeddings([out[VIT.IMAGE_EMBEDS.name] for out in outputs], grids, self.merge_size)
