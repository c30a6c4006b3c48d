"""The `vlm` model's media path: image/video bytes -> (grid_thw, embeddings), each distinct medium encoded once.

For the media of one request:
1. key every medium (content hash + its own options, such as fps or max_pixels, resolved against the
   media settings) and drop duplicates;
2. join an encoding of the same key that this `vlm` instance is already running for another request;
3. ask the shared `vit_cache` model for the rest (when the cache is on), and prepare the misses
   concurrently (the vision backend learns their grids: vlmserve.media.vision);
4. with every grid_thw known, let the caller admit or reject the request (its prompt length follows
   from the grids) before any ViT work;
5. have the vision backend encode the misses, and store the results in the cache.
`vit_cache` is reached through `infer` (a BLS call inside tritonserver: vlmserve.triton_utils.bls_infer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vlmserve.contracts import VIT_CACHE
from vlmserve.media.settings import MediaSettings
from vlmserve.media.vision import Encoded, Infer, Medium, Prepared, VisionBackend

# Called with the grid_thw of every part, in order, before any ViT call; raises InvalidRequest to reject.
Admission = Callable[[list[np.ndarray]], None]


@dataclass
class _Pending:
    """An encoding one request runs and others may join: its grid comes first, its embeddings later."""

    grid: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    result: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def fail(self, exc: BaseException) -> None:
        for future in (self.grid, self.result):
            if not future.done():
                future.set_exception(exc)
                future.exception()  # nobody joining is not an "exception never retrieved"


class _Abandoned(Exception):
    """The request that ran an encoding stopped before its ViT call (rejected or cancelled): joiners redo it."""


def _key_tensor(key: str) -> np.ndarray:
    return np.asarray([key.encode()], dtype=np.object_)


class MediaEncoder:
    def __init__(self, vision: VisionBackend, settings: MediaSettings, cache: Infer | None = None) -> None:
        """``settings`` as the vision side resolves media (so cache keys match what it produces); ``cache``
        reaches the `vit_cache` model (None: no cache)."""
        self.vision = vision
        self.settings = settings
        self.cache = cache
        self._running: dict[str, asyncio.Future] = {}  # key -> result of an encoding in progress

    async def encode(self, parts: list[dict], media: list[bytes], admit: Admission | None = None,
                     token_budget: int | None = None) -> list[Encoded]:
        """One Encoded per (part, bytes) pair, in order; InvalidRequest for media the user got wrong.

        ``admit`` sees every grid_thw once they are known and before any ViT call runs; ``token_budget`` is
        the most tokens any one medium may become (Medium.token_budget).
        """
        keys, distinct = [], {}
        for part, data in zip(parts, media):
            options = self.settings.resolve(part)
            keys.append(self.settings.cache_key(data, options))
            distinct.setdefault(keys[-1], Medium(options, data, token_budget))
        done: dict[str, Encoded] = {}
        while True:
            try:
                await self._encode_into(done, {k: m for k, m in distinct.items() if k not in done}, keys, admit)
                return [done[key] for key in keys]
            except _Abandoned:
                continue  # a request we joined went away first: encode the rest again, now as their owner

    async def _encode_into(self, done: dict[str, Encoded], todo: dict[str, Medium], keys: list[str],
                           admit: Admission | None) -> None:
        joined = {key: self._running[key] for key in todo if key in self._running}
        own = {key: _Pending() for key in todo if key not in joined}
        self._running.update(own)
        shared = False  # whether a failure is the media's own (bad bytes, a failed call), which joiners share
        try:
            shared = True
            ready = await self._prepare({key: todo[key] for key in own})
            shared = False
            for key, value in ready.items():
                own[key].grid.set_result(value.grid_thw)
            # shield: if this request goes away, the request that owns the encoding still gets it.
            joined_grids = await asyncio.gather(*(asyncio.shield(p.grid) for p in joined.values()))
            if admit is not None:
                grids = {key: e.grid_thw for key, e in done.items()}
                grids.update((key, value.grid_thw) for key, value in ready.items())
                grids.update(zip(joined, joined_grids))
                admit([grids[key] for key in keys])
            shared = True
            encoded = await self._finish(ready)
            shared = False
            for key, value in encoded.items():
                own[key].result.set_result(value)
            done.update(encoded)
        except BaseException as exc:
            for pending in own.values():
                pending.fail(exc if shared and not isinstance(exc, asyncio.CancelledError) else _Abandoned())
            raise
        finally:
            for key in own:
                del self._running[key]
        done.update(zip(joined, await asyncio.gather(*(asyncio.shield(p.result) for p in joined.values()))))

    async def _prepare(self, media: dict[str, Medium]) -> dict[str, Encoded | Prepared]:
        """Cache hits as they are, the misses prepared by the vision backend."""
        found: dict[str, Encoded | Prepared] = {}
        if self.cache is not None:
            hits = await asyncio.gather(*map(self._lookup, media))
            found = {key: hit for key, hit in zip(media, hits) if hit is not None}
        misses = [key for key in media if key not in found]
        found.update(zip(misses, await asyncio.gather(*(self.vision.prepare(media[key]) for key in misses))))
        return found

    async def _finish(self, ready: dict[str, Encoded | Prepared]) -> dict[str, Encoded]:
        """Embeddings of every entry: the prepared ones through the vision backend, then into the cache."""
        todo = {key: value for key, value in ready.items() if isinstance(value, Prepared)}
        encoded = {key: value for key, value in ready.items() if isinstance(value, Encoded)}
        if todo:
            embeds = await self.vision.encode(list(todo.values()))
            fresh = [Encoded(key, p.grid_thw, e) for (key, p), e in zip(todo.items(), embeds)]
            if self.cache is not None:
                await asyncio.gather(*map(self._store, fresh))
            encoded.update((e.key, e) for e in fresh)
        return encoded

    async def _lookup(self, key: str) -> Encoded | None:
        out = await self.cache(VIT_CACHE.NAME, {VIT_CACHE.KEY.name: _key_tensor(key)},
                           [spec.name for spec in VIT_CACHE.outputs])
        if not out[VIT_CACHE.FOUND.name][0]:
            return None
        return Encoded(key, out[VIT_CACHE.GRID_THW.name], out[VIT_CACHE.EMBEDS.name])

    async def _store(self, value: Encoded) -> None:
        inputs = {VIT_CACHE.KEY.name: _key_tensor(value.key), VIT_CACHE.EMBEDS.name: value.embeds,
                  VIT_CACHE.GRID_THW.name: value.grid_thw}
        await self.cache(VIT_CACHE.NAME, inputs, [VIT_CACHE.FOUND.name])
