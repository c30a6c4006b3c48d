"""The `vlm` model's media path: image/video bytes -> (grid_thw, embeddings), each distinct medium encoded once.

For the media of one request:
1. key every medium (content hash + its own options, such as fps or max_pixels, resolved against the
   media settings) and drop duplicates;
2. join an encoding of the same key that this `vlm` instance is already running for another request;
3. ask the shared `vit_cache` model for the rest (when the cache is on), and preprocess the misses
   concurrently (decoding happens in the `preprocess` instances);
4. with every grid_thw known, let the caller admit or reject the request (its prompt length follows
   from the grids) before any ViT work;
5. pack the misses into as few `vit` calls as the patch budget allows (`vlmserve.vit.packing`), run
   those calls concurrently and store the results in the cache.
The three models are reached through `infer` (BLS calls inside tritonserver: vlmserve.triton_utils.bls_infer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from vlmserve.contracts import PREPROCESS, VIT, VIT_CACHE
from vlmserve.media.settings import MediaSettings, MediumOptions
from vlmserve.media.preprocessing import VisionPreprocessor
from vlmserve.vit.packing import pack_vit_calls, split_embeddings
from vlmserve.vlm_settings import VlmSettings

# Called with the grid_thw of every part, in order, before any ViT call; raises InvalidRequest to reject.
Admission = Callable[[list[np.ndarray]], None]
# One call of a model: (model name, inputs by name, output names) -> outputs by name; InvalidRequest for the
# client's mistakes (bad media).
Infer = Callable[[str, Mapping[str, np.ndarray], list[str]], Awaitable[dict[str, np.ndarray]]]


@dataclass(frozen=True)
class Encoded:
    key: str  # content hash + everything that shapes the ViT input (MediaSettings.cache_key)
    grid_thw: np.ndarray  # int64 [3]
    embeds: np.ndarray  # float32 [tokens, hidden]


@dataclass(frozen=True)
class _Medium:
    options: MediumOptions
    data: bytes


@dataclass(frozen=True)
class _Preprocessed:
    pixels: np.ndarray
    grid_thw: np.ndarray


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
    def __init__(self, infer: Infer, settings: MediaSettings, merge_size: int, max_patches: int,
                 use_cache: bool) -> None:
        self.infer = infer
        self.settings = settings
        self.merge_size = merge_size
        self.max_patches = max_patches
        self.use_cache = use_cache
        self._running: dict[str, asyncio.Future] = {}  # key -> result of an encoding in progress

    @classmethod
    def from_settings(cls, infer: Infer, settings: VlmSettings, params: Mapping[str, str]) -> MediaEncoder:
        """Media settings (in ``params``) as the `preprocess` model resolves them, so cache keys match what
        it produces."""
        preprocessor = VisionPreprocessor.from_pretrained(settings.checkpoint_dir)
        return cls(infer, preprocessor.media_settings().with_parameters(params), preprocessor.merge_size,
                   settings.vit_max_patches, settings.vit_cache)

    async def encode(self, parts: list[dict], media: list[bytes], admit: Admission | None = None) -> list[Encoded]:
        """One Encoded per (part, bytes) pair, in order; InvalidRequest for media the user got wrong.

        ``admit`` sees every grid_thw once they are known and before any ViT call runs.
        """
        keys, distinct = [], {}
        for part, data in zip(parts, media):
            options = self.settings.resolve(part)
            keys.append(self.settings.cache_key(data, options))
            distinct.setdefault(keys[-1], _Medium(options, data))
        done: dict[str, Encoded] = {}
        while True:
            try:
                await self._encode_into(done, {k: m for k, m in distinct.items() if k not in done}, keys, admit)
                return [done[key] for key in keys]
            except _Abandoned:
                continue  # a request we joined went away first: encode the rest again, now as their owner

    async def _encode_into(self, done: dict[str, Encoded], todo: dict[str, _Medium], keys: list[str],
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

    async def _prepare(self, media: dict[str, _Medium]) -> dict[str, Encoded | _Preprocessed]:
        """Cache hits as they are, the misses preprocessed."""
        found: dict[str, Encoded | _Preprocessed] = {}
        if self.use_cache:
            hits = await asyncio.gather(*map(self._lookup, media))
            found = {key: hit for key, hit in zip(media, hits) if hit is not None}
        misses = [key for key in media if key not in found]
        found.update(zip(misses, await asyncio.gather(*(self._preprocess(media[key]) for key in misses))))
        return found

    async def _finish(self, ready: dict[str, Encoded | _Preprocessed]) -> dict[str, Encoded]:
        """Embeddings of every entry: the preprocessed ones through packed `vit` calls, then into the cache."""
        todo = {key: value for key, value in ready.items() if isinstance(value, _Preprocessed)}
        encoded = {key: value for key, value in ready.items() if isinstance(value, Encoded)}
        if todo:
            grids = [value.grid_thw for value in todo.values()]
            calls = pack_vit_calls([value.pixels for value in todo.values()], grids, self.merge_size,
                                   self.max_patches)
            outputs = await asyncio.gather(*(self.infer(VIT.NAME, call, [VIT.IMAGE_EMBEDS.name]) for call in calls))
            embeds = split_embeddings([out[VIT.IMAGE_EMBEDS.name] for out in outputs], grids, self.merge_size)
            fresh = [Encoded(key, grid, e) for key, grid, e in zip(todo, grids, embeds)]
            if self.use_cache:
                await asyncio.gather(*map(self._store, fresh))
            encoded.update((e.key, e) for e in fresh)
        return encoded

    async def _preprocess(self, medium: _Medium) -> _Preprocessed:
        inputs = {PREPROCESS.MEDIA.name: np.asarray([medium.data], dtype=np.object_),
                  PREPROCESS.KIND.name: np.asarray([medium.options.kind], dtype=np.object_)}
        for name, spec in PREPROCESS.OPTIONS.items():
            value = getattr(medium.options, name)
            if value is not None:
                inputs[spec.name] = np.asarray([value], dtype=spec.numpy_dtype)
        out = await self.infer(PREPROCESS.NAME, inputs, [PREPROCESS.PIXEL_VALUES.name, PREPROCESS.GRID_THW.name])
        return _Preprocessed(out[PREPROCESS.PIXEL_VALUES.name], out[PREPROCESS.GRID_THW.name].reshape(3))

    async def _lookup(self, key: str) -> Encoded | None:
        out = await self.infer(VIT_CACHE.NAME, {VIT_CACHE.KEY.name: _key_tensor(key)},
                           [spec.name for spec in VIT_CACHE.outputs])
        if not out[VIT_CACHE.FOUND.name][0]:
            return None
        return Encoded(key, out[VIT_CACHE.GRID_THW.name], out[VIT_CACHE.EMBEDS.name])

    async def _store(self, value: Encoded) -> None:
        inputs = {VIT_CACHE.KEY.name: _key_tensor(value.key), VIT_CACHE.EMBEDS.name: value.embeds,
                  VIT_CACHE.GRID_THW.name: value.grid_thw}
        await self.infer(VIT_CACHE.NAME, inputs, [VIT_CACHE.FOUND.name])
