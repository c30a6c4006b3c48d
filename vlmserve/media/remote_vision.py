"""The media encoder's vision backend on a host whose ViT runs elsewhere: a pool of ViT servers over gRPC.

What crosses the network per medium: its bytes and resolved options out, its grid_thw and embeddings back
(each server preprocesses and runs its own `vit`). An image's grid follows from its header (its size, the
resolved min/max_pixels), so a request is admitted before any ViT work as it is on one host; the server's
grid must agree. A video's grid needs its frames decoded, so a video is encoded when it is prepared, with its
token budget: the server refuses it before its ViT work if it would not fit, and the request is admitted
once its grid is back.
"""

from __future__ import annotations

import asyncio

import numpy as np

from vlmserve.contracts import ENCODE
from vlmserve.media.decode import image_size
from vlmserve.media.preprocessing import VisionPreprocessor
from vlmserve.media.vision import Medium, Prepared, options_inputs
from vlmserve.vit.pool import VitPool


class RemoteVision:
    def __init__(self, pool: VitPool, preprocessor: VisionPreprocessor) -> None:
        self.pool = pool
        self.preprocessor = preprocessor
        self.max_image_pixels = preprocessor.media_settings().max_image_pixels

    async def prepare(self, medium: Medium) -> Prepared:
        options = medium.options
        if options.kind == "image":
            width, height = image_size(medium.data, self.max_image_pixels)
            return Prepared(self.preprocessor.image_grid(height, width, options.min_pixels, options.max_pixels),
                            medium)
        grid, embeds = await self._encode(medium)
        return Prepared(grid, embeds)

    async def encode(self, prepared: list[Prepared]) -> list[np.ndarray]:
        async def embeddings(p: Prepared) -> np.ndarray:
            if isinstance(p.payload, np.ndarray):  # encoded when it was prepared
                return p.payload
            grid, embeds = await self._encode(p.payload)
            if not np.array_equal(grid, p.grid_thw):
                raise RuntimeError(f"a ViT server gave grid {grid.tolist()} for an image of grid "
                                   f"{p.grid_thw.tolist()}: its media settings differ from this host's")
            return embeds

        return list(await asyncio.gather(*map(embeddings, prepared)))

    async def _encode(self, medium: Medium) -> tuple[np.ndarray, np.ndarray]:
        inputs = options_inputs(medium)
        if medium.token_budget is not None:
            inputs[ENCODE.MAX_TOKENS.name] = np.asarray([medium.token_budget], dtype=np.int64)
        out = await self.pool.encode(inputs)
        return out[ENCODE.GRID_THW.name].reshape(3), out[ENCODE.EMBEDS.name]
