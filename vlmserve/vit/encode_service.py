"""A ViT server's `encode` model without Triton: one medium's bytes and options -> its grid_thw and embeddings.

The same media path as the `vlm` model's on a single host (vlmserve.media.encoder with LocalVision: the
`preprocess` and `vit` models of this tritonserver, through `infer`), without the embedding cache, which
stays on the LLM host. Media that arrive together for the same bytes and options are encoded once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future

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
        self.encoder = MediaEncoder(LocalVision(infer, preprocessor.merge_size, settings.vit_max_patches),
                                    preprocessor.media_settings().with_parameters(params))
        self.loop = LoopThread("vit-server", MODEL_CALL_THREADS)

    def submit(self, data: bytes, part: dict, done: Callable[[Future[list[Encoded]]], None]) -> None:
        """Encode one medium (any thread); ``done`` gets the future of its one Encoded (or its error)."""
        self.loop.submit(self.encoder.encode([part], [data])).add_done_callback(done)

    def shutdown(self) -> None:
        self.loop.stop()
