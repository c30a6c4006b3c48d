"""The `vlm` model's media path: image/video bytes -> (grid_thw, embeddings), each distinct medium encoded once.

For the media of one request:
1. key every medium (content hash + kind + fps + media settings) and drop duplicates;
2. join an encoding of the same key that this `vlm` instance is already running for another request;
3. ask the shared `vit_cache` model for the rest (when the cache is on);
4. preprocess the misses concurrently (decoding happens in the `preprocess` instances), pack them
   into as few `vit` calls as the patch budget allows (`vlmserve.vit_packing`), run those calls
   concurrently and store the results in the cache.
Runs inside tritonserver only (BLS calls).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from vlmserve.errors import INVALID_REQUEST_PREFIX, InvalidRequest
from vlmserve.media_settings import MediaSettings
from vlmserve.preprocessing import VisionPreprocessor
from vlmserve.vit_packing import MAX_PATCHES_PER_CALL, pack_vit_calls, split_embeddings


@dataclass(frozen=True)
class Encoded:
    key: str  # content hash + everything that shapes the ViT input (MediaSettings.cache_key)
    grid_thw: np.ndarray  # int64 [3]
    embeds: np.ndarray  # float32 [tokens, hidden]


@dataclass(frozen=True)
class _Medium:
    kind: str
    fps: float | None
    data: bytes


async def _infer(model: str, inputs: Mapping[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    response = await pb_utils.InferenceRequest(
        model_name=model, inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()],
        requested_output_names=outputs).async_exec()
    if response.has_error():
        message = response.error().message()
        if INVALID_REQUEST_PREFIX in message:  # bad media: the client's mistake, not ours
            raise InvalidRequest(message.split(INVALID_REQUEST_PREFIX, 1)[1])
        raise RuntimeError(f"{model}: {message}")
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}


def _key_tensor(key: str) -> np.ndarray:
    return np.asarray([key.encode()], dtype=np.object_)


class MediaEncoder:
    def __init__(self, settings: MediaSettings, merge_size: int, max_patches: int, use_cache: bool) -> None:
        self.settings = settings
        self.merge_size = merge_size
        self.max_patches = max_patches
        self.use_cache = use_cache
        self._running: dict[str, asyncio.Future] = {}  # key -> result of an encoding in progress

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], checkpoint_dir: str | Path) -> MediaEncoder:
        """Settings as the `preprocess` model resolves them, so cache keys match what it produces."""
        preprocessor = VisionPreprocessor.from_pretrained(checkpoint_dir)
        return cls(preprocessor.media_settings().with_parameters(params), preprocessor.merge_size,
                   int(params.get("vit_max_patches", MAX_PATCHES_PER_CALL)), params.get("vit_cache") == "true")

    async def encode(self, parts: list[dict], media: list[bytes]) -> list[Encoded]:
        """One Encoded per (part, bytes) pair, in order; InvalidRequest for media the user got wrong."""
        keys, distinct = [], {}
        for part, data in zip(parts, media):
            kind = part["type"]
            fps = self.settings.fps_for(part.get("fps")) if kind == "video" else None
            keys.append(self.settings.cache_key(data, kind, fps))
            distinct.setdefault(keys[-1], _Medium(kind, fps, data))
        joined = {key: self._running[key] for key in distinct if key in self._running}
        own = {key: medium for key, medium in distinct.items() if key not in joined}
        results = await self._encode_own(own) if own else {}
        # shield: if this request goes away, the request that owns the encoding still gets it.
        results.update(zip(joined, await asyncio.gather(*map(asyncio.shield, joined.values()))))
        return [results[key] for key in keys]

    async def _encode_own(self, media: dict[str, _Medium]) -> dict[str, Encoded]:
        loop = asyncio.get_running_loop()
        futures = {key: loop.create_future() for key in media}
        self._running.update(futures)
        try:
            encoded = await self._cached_or_run(media)
            for key, future in futures.items():
                future.set_result(encoded[key])
            return encoded
        except Exception as exc:
            for future in futures.values():
                future.set_exception(exc)  # requests that joined fail the same way
                future.exception()  # ...and nobody joining is not an "exception never retrieved"
            raise
        finally:
            for key, future in futures.items():
                future.cancel()  # no-op unless we were cancelled ourselves
                del self._running[key]

    async def _cached_or_run(self, media: dict[str, _Medium]) -> dict[str, Encoded]:
        found: dict[str, Encoded] = {}
        if self.use_cache:
            hits = await asyncio.gather(*map(self._lookup, media))
            found = {key: hit for key, hit in zip(media, hits) if hit is not None}
        misses = {key: medium for key, medium in media.items() if key not in found}
        if misses:
            encoded = await self._run(misses)
            found.update((e.key, e) for e in encoded)
            if self.use_cache:
                await asyncio.gather(*map(self._store, encoded))
        return found

    async def _run(self, media: dict[str, _Medium]) -> list[Encoded]:
        pre = await asyncio.gather(*map(self._preprocess, media.values()))
        pixels, grids = [p for p, _ in pre], [g for _, g in pre]
        calls = pack_vit_calls(pixels, grids, self.merge_size, self.max_patches)
        outputs = await asyncio.gather(*(_infer("vit", call, ["image_embeds"]) for call in calls))
        embeds = split_embeddings([out["image_embeds"] for out in outputs], grids, self.merge_size)
        return [Encoded(key, grid, e) for key, grid, e in zip(media, grids, embeds)]

    async def _preprocess(self, medium: _Medium) -> tuple[np.ndarray, np.ndarray]:
        inputs = {"MEDIA": np.asarray([medium.data], dtype=np.object_),
                  "KIND": np.asarray([medium.kind], dtype=np.object_)}
        if medium.fps is not None:
            inputs["FPS"] = np.asarray([medium.fps], dtype=np.float32)
        out = await _infer("preprocess", inputs, ["PIXEL_VALUES", "GRID_THW"])
        return out["PIXEL_VALUES"], out["GRID_THW"].reshape(3)

    async def _lookup(self, key: str) -> Encoded | None:
        out = await _infer("vit_cache", {"KEY": _key_tensor(key)}, ["FOUND", "EMBEDS", "GRID_THW"])
        return Encoded(key, out["GRID_THW"], out["EMBEDS"]) if out["FOUND"][0] else None

    async def _store(self, value: Encoded) -> None:
        await _infer("vit_cache", {"KEY": _key_tensor(value.key), "EMBEDS": value.embeds, "GRID_THW": value.grid_thw},
                     ["FOUND"])
