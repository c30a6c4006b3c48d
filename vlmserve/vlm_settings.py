"""The `vlm` model's own settings, as the repository generator writes them into its config.pbtxt.

Its media limits travel in the same parameters, as vlmserve.media.settings.MediaSettings (the
`preprocess` model gets the same ones, so both resolve a medium alike).
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmserve.model_parameters import ModelParameters
from vlmserve.vit.packing import MAX_PATCHES_PER_CALL


@dataclass(frozen=True)
class VlmSettings(ModelParameters):
    checkpoint_dir: str
    max_model_len: int = 0  # 0: the checkpoint's max_position_embeddings; longer prompts are refused first
    max_media_per_request: int = 16
    max_concurrent_streams: int = 256  # threads that read `llm` response streams
    vit_max_patches: int = MAX_PATCHES_PER_CALL  # packing budget per `vit` call
    vit_cache: bool = True  # whether a `vit_cache` model is there to ask
