"""A client's request -> the engine's: the prompt's token ids, each medium's embeddings, the sampling options.

A request that cannot be served is refused before the expensive work: the context admission (the prompt
plus max_tokens must fit, InvalidRequest naming both numbers as vLLM does) runs once the media's grids
are known, before any ViT call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import numpy as np
from transformers import AutoConfig

from vlmserve.engine.request import EngineRequest, MediaInput
from vlmserve.errors import InvalidRequest
from vlmserve.inputs.prompt import PromptBuilder, media_parts
from vlmserve.inputs.request import ClientRequest
from vlmserve.media.encoder import MediaEncoder
from vlmserve.media.preprocessing import VisionPreprocessor
from vlmserve.media.remote_vision import RemoteVision
from vlmserve.media.vision import Infer, LocalVision
from vlmserve.vit.pool import VitPool
from vlmserve.sampling_options import DEFAULT_MAX_TOKENS, checkpoint_defaults, max_tokens_for
from vlmserve.vlm_settings import VlmSettings


class InputProcessor:
    def __init__(self, prompts: PromptBuilder, media: MediaEncoder, max_model_len: int, max_media: int,
                 sampling_defaults: dict) -> None:
        self.prompts = prompts
        self.media = media
        self.max_model_len = max_model_len
        self.max_media = max_media
        # The server's sampling defaults: the checkpoint's generation config over ours, as vLLM's server does.
        self.sampling_defaults = dict(sampling_defaults)
        self.default_max_tokens = self.sampling_defaults.pop("max_tokens", DEFAULT_MAX_TOKENS)

    @classmethod
    def loader(cls, settings: VlmSettings, params: Mapping[str, str], infer: Infer, tokenizer,
               vit_pool: VitPool | None = None) -> Callable[[int], InputProcessor]:
        """Load what the checkpoint of `settings` needs (media limits from `params`; the vision models reached
        by `infer`, or the ViT servers of `vit_pool`); the processor follows once the engine says its context
        length."""
        config = AutoConfig.from_pretrained(settings.checkpoint_dir)
        prompts = PromptBuilder(tokenizer, config.image_token_id, config.video_token_id,
                                config.vision_config.spatial_merge_size)
        # The media settings as the vision side resolves media, so cache keys match what it produces.
        preprocessor = VisionPreprocessor.from_pretrained(settings.checkpoint_dir)
        media_settings = preprocessor.media_settings().with_parameters(params)
        vision = (LocalVision(infer, preprocessor.merge_size, settings.vit_max_patches) if vit_pool is None
                  else RemoteVision(vit_pool, preprocessor.with_settings(media_settings)))
        media = MediaEncoder(vision, media_settings, infer if settings.vit_cache else None)
        return functools.partial(cls, prompts, media, max_media=settings.max_media_per_request,
                                 sampling_defaults=checkpoint_defaults(settings.checkpoint_dir))

    async def process(self, request: ClientRequest, media: list[bytes]) -> EngineRequest:
        """InvalidRequest for what the client got wrong: media that do not match the messages, too many or
        bad media, a prompt that does not fit the context."""
        requested = request.sampling.get("max_tokens")
        if request.prompt is not None:
            prompt_ids = self.prompts.raw(request.prompt)
            return self._engine_request(prompt_ids, request.sampling, self._max_tokens(requested, len(prompt_ids)))
        parts = media_parts(request.messages)
        if len(parts) != len(media):
            raise InvalidRequest(f"{len(parts)} image/video parts but {len(media)} media inputs")
        if len(media) > self.max_media:
            raise InvalidRequest(f"at most {self.max_media} images/videos per request, got {len(media)}")
        kinds = [part["type"] for part in parts]
        admitted: list = []  # the prompt and max_tokens, once the grids the ViT encodes fix them

        def admit(grids: list[np.ndarray]) -> None:  # the grids fix the prompt length: reject before ViT work
            prompt_ids = self.prompts.build(request.messages, list(zip(kinds, grids)))
            admitted[:] = [prompt_ids, self._max_tokens(requested, len(prompt_ids))]

        if media:  # deduplicated, cached and batched by the media encoder; it calls admit before any ViT work
            # No medium can take more than the context less the answer's least length.
            encoded = await self.media.encode(parts, media, admit, token_budget=self.max_model_len - (requested or 1))
        else:
            encoded = []
            admit([])
        prompt_ids, max_tokens = admitted
        media_inputs = [MediaInput(kind, e.key, e.grid_thw, e.embeds) for kind, e in zip(kinds, encoded)]
        return self._engine_request(prompt_ids, request.sampling, max_tokens, media_inputs)

    def _max_tokens(self, requested: int | None, prompt_tokens: int) -> int:
        return max_tokens_for(requested, prompt_tokens, self.max_model_len, self.default_max_tokens)

    def _engine_request(self, prompt_ids: np.ndarray, sampling: dict, max_tokens: int,
                        media: list[MediaInput] | None = None) -> EngineRequest:
        return EngineRequest(prompt_ids, {**self.sampling_defaults, **sampling, "max_tokens": max_tokens}, media or [])
