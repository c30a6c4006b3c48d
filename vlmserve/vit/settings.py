"""The settings of the `vit`, `vit_cache` and `encode` models (config.pbtxt parameters), apart from the code
that runs them so that the repository generator imports no ONNX Runtime for them."""

from __future__ import annotations

from dataclasses import dataclass

from vlmserve.model_parameters import ModelParameters
from vlmserve.vit.packing import MAX_PATCHES_PER_CALL


@dataclass(frozen=True)
class VitRunnerSettings(ModelParameters):
    """The CPU `vit` model: the exported graph, and the threads ONNX Runtime may use."""

    onnx_path: str
    # Triton may run several model instances side by side: each is capped instead of every session
    # taking all cores, which would starve the LLM.
    intra_op_threads: int = 1


@dataclass(frozen=True)
class VitCacheSettings(ModelParameters):
    """The `vit_cache` model: the bytes of embeddings it holds at most (least recently used go first)."""

    max_bytes: int


@dataclass(frozen=True)
class EncodeSettings(ModelParameters):
    """A ViT server's `encode` model (its media limits travel in the same parameters, as `preprocess`'s)."""

    checkpoint_dir: str
    vit_max_patches: int = MAX_PATCHES_PER_CALL  # packing budget per `vit` call
