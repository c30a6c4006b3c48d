"""A ViT server's `encode` model without Triton: one medium's bytes and options -> its grid_thw and embeddings.

The same media path as the `vlm` model's on a single host (vlmserve.media.encoder with LocalVision: the
`preprocess` and `vit` models of this tritonserver, through `infer`), without the embedding cache, which
stays on the LLM host. Media that arrive together for the same bytes and options are encoded once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future

import numpy as np

from vlmserve.errors import InvalidRequest
from vlmserve.event_loop import LoopThread
from vlmserve.media.encoder import MediaEncoder
from vlmserve.media.preprocessing import VisionPreprocessor
from vlmserve.media.vision import Encoded, Infer, LocalVision
from vlmserve.vit.settings import EncodeSettings

# Media in flight at once: each holds a thread only while its BLS call waits.
MODEL_CALL_THREADS = 32


class EncodeService:
    def __init__(self, settings: EncodeSettings, params: Mapping[str, str], infer: Infer) -> None:
        preprocessor = VisionPreprocessor.from_pretrained(settings.checkpoint_dir)
        self.tokens = preprocessor.num_vision_tokens
        self.encoder = MediaEncoder(LocalVision(infer, preprocessor.merge_size, settings.vit_max_patches),
                                    preprocessor.media_settings().with_parameters(params))
        self.loop = LoopThread("vit-server", MODEL_CALL_THREADS)

    def submit(self, data: bytes, part: dict, max_tokens: int | None,
               done: Callable[[Future[list[Encoded]]], None]) -> None:
        """Encode one medium (any thread) unless it would become more than ``max_tokens`` LLM tokens (an
        InvalidRequest before any ViT work); ``done`` gets the future of its one Encoded (or its error)."""
        def admit(grids: list[np.ndarray]) -> None:
            if max_tokens is not None and self.tokens(grids[0]) > max_tokens:
                raise InvalidRequest(f"the {part['type']} would take {self.tokens(grids[0])} tokens of the context, "
                                     f"which leaves it at most {max_tokens}")

        self.loop.submit(self.encoder.encode([part], [data], admit)).add_done_callback(done)

    def shutdown(self) -> None:
        self.loop.stop()
