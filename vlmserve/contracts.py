"""What the Triton models exchange: each model's name and tensors, and how an error crosses a model boundary.

The one place these are spelled: the models' code, the `vlm` BLS calls, the gRPC client and the
repository generator (which writes each config.pbtxt from `inputs` / `outputs`) all read them here.
Standard library and numpy only, so the client and the generator import it without torch or Triton.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from vlmserve.errors import InvalidRequest, Unavailable


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # the config.pbtxt data_type, e.g. "TYPE_INT64"
    dims: tuple[int, ...]  # -1: any size
    optional: bool = False

    @property
    def numpy_dtype(self) -> type:
        return _NUMPY_DTYPES[self.dtype]


_NUMPY_DTYPES = {"TYPE_FP32": np.float32, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64, "TYPE_BOOL": np.bool_,
                 "TYPE_UINT8": np.uint8, "TYPE_STRING": np.object_}


class PREPROCESS:
    """Media bytes -> ViT pixel values and grid_thw."""

    NAME = "preprocess"
    MEDIA = TensorSpec("MEDIA", "TYPE_STRING", (1,))
    KIND = TensorSpec("KIND", "TYPE_STRING", (1,))  # "image" or "video"
    # A request's own options, one per MediumOptions field, clamped into the deployment's limits.
    OPTIONS = {"fps": TensorSpec("FPS", "TYPE_FP32", (1,), optional=True),
               "min_pixels": TensorSpec("MIN_PIXELS", "TYPE_INT64", (1,), optional=True),
               "max_pixels": TensorSpec("MAX_PIXELS", "TYPE_INT64", (1,), optional=True),
               "max_frames": TensorSpec("MAX_FRAMES", "TYPE_INT64", (1,), optional=True)}
    PIXEL_VALUES = TensorSpec("PIXEL_VALUES", "TYPE_FP32", (-1, -1))
    GRID_THW = TensorSpec("GRID_THW", "TYPE_INT64", (3,))
    inputs = (MEDIA, KIND, *OPTIONS.values())
    outputs = (PIXEL_VALUES, GRID_THW)


class VIT:
    """The vision tower: the same tensors on both targets (the TensorRT plan on GPU, the ONNX graph run from
    Python on CPU), named as the exported graph names them (export/vision_onnx.py)."""

    NAME = "vit"
    PIXEL_VALUES = TensorSpec("pixel_values", "TYPE_FP32", (-1, -1))
    POSITION_IDS = TensorSpec("position_ids", "TYPE_INT64", (-1, 2))  # (h, w) rotary ids per patch
    SEGMENT_IDS = TensorSpec("segment_ids", "TYPE_INT64", (-1,))  # attention segment (frame) of each patch
    IMAGE_EMBEDS = TensorSpec("image_embeds", "TYPE_FP32", (-1, -1))  # a quarter of the rows of pixel_values
    inputs = (PIXEL_VALUES, POSITION_IDS, SEGMENT_IDS)
    outputs = (IMAGE_EMBEDS,)


class VIT_CACHE:
    """The server's one ViT embedding cache. KEY alone is a lookup: FOUND, and EMBEDS / GRID_THW when found
    (empty otherwise). KEY with EMBEDS and GRID_THW is a store: FOUND says whether it was kept (False: larger
    than the budget)."""

    NAME = "vit_cache"
    KEY = TensorSpec("KEY", "TYPE_STRING", (1,))  # MediaSettings.cache_key
    EMBEDS = TensorSpec("EMBEDS", "TYPE_FP32", (-1, -1))
    GRID_THW = TensorSpec("GRID_THW", "TYPE_INT64", (3,))
    FOUND = TensorSpec("FOUND", "TYPE_BOOL", (1,))
    inputs = (KEY, replace(EMBEDS, optional=True), replace(GRID_THW, optional=True))
    outputs = (FOUND, EMBEDS, GRID_THW)


class ENCODE:
    """A ViT server's entry point (the vision side of a deployment on a host of its own): one medium's bytes and
    its resolved options in, its grid_thw and embeddings out. Preprocessing and the `vit` calls happen on that
    server, so pixel values never cross the network."""

    NAME = "encode"
    # The most LLM tokens the medium may become: one over it is refused before any `vit` call (the LLM host
    # admits a request by its media's grids, and learns a video's only from here).
    MAX_TOKENS = TensorSpec("MAX_TOKENS", "TYPE_INT64", (1,), optional=True)
    inputs = (*PREPROCESS.inputs, MAX_TOKENS)
    GRID_THW = PREPROCESS.GRID_THW
    EMBEDS = TensorSpec("EMBEDS", "TYPE_FP32", (-1, -1))  # the `vit` output, as the `vit` model's dtype gives it
    outputs = (GRID_THW, EMBEDS)


class VLM:
    """The decoupled model clients call, which owns the LLM engine: a JSON request and media bytes in, text
    streamed out. Every response has TEXT (LOGPROBS too when asked for); the last one also the rest."""

    NAME = "vlm"
    REQUEST = TensorSpec("REQUEST", "TYPE_STRING", (1,))  # JSON: messages or prompt, and sampling
    MEDIA = TensorSpec("MEDIA", "TYPE_STRING", (-1,), optional=True)  # bytes of each image/video part, in order
    # UTF-8 as bytes: a BYTES tensor costs the sending model a serialization in Python for every response.
    TEXT = TensorSpec("TEXT", "TYPE_UINT8", (-1,))
    # The finish reason and the usage counts: on the last response only.
    FINISH_REASON = TensorSpec("FINISH_REASON", "TYPE_STRING", (1,))
    PROMPT_TOKENS = TensorSpec("PROMPT_TOKENS", "TYPE_INT32", (1,))
    COMPLETION_TOKENS = TensorSpec("COMPLETION_TOKENS", "TYPE_INT32", (1,))
    CACHED_TOKENS = TensorSpec("CACHED_TOKENS", "TYPE_INT32", (1,))
    LOGPROBS = TensorSpec("LOGPROBS", "TYPE_UINT8", (-1,))  # UTF-8 JSON: OpenAI's logprob entries of TEXT's tokens
    inputs = (REQUEST, MEDIA)
    outputs = (TEXT, FINISH_REASON, PROMPT_TOKENS, COMPLETION_TOKENS, CACHED_TOKENS, LOGPROBS)


# Errors between models. A model reports an InvalidRequest with Triton's INVALID_ARG code
# (vlmserve.triton_utils.triton_error), but the code does not reach the models and client that need it:
# in Triton 2.51 a BLS response comes back as INTERNAL whatever the callee sent (the Python backend rebuilds
# the error from its message alone; r25.04 keeps the code), and a gRPC stream response has only an error
# message. So the message carries this marker, and the user's text follows it; the proxy answers HTTP 400.
INVALID_REQUEST_MARKER = "invalid_request: "
# What a model reports for vlmserve.errors.Unavailable: the proxy answers 503 with Retry-After.
UNAVAILABLE_MARKER = "unavailable: "
# How Triton 2.51 words it when a model that a request reaches (`vlm`, or one that `vlm` calls) has a dead
# backend process, is being unloaded or loaded again, or the server is stopping; and our own marker.
UNAVAILABLE_MESSAGES = ("is not healthy", "is not ready", "Request for unknown model", "has no available versions",
                        "Server is stopping", "Server not ready", UNAVAILABLE_MARKER)


def encode_error(exc: Exception) -> str:
    """The error message a model reports for ``exc``: user mistakes and unavailable parts marked, anything else
    an internal error."""
    if isinstance(exc, InvalidRequest):
        return INVALID_REQUEST_MARKER + str(exc)
    if isinstance(exc, Unavailable):
        return UNAVAILABLE_MARKER + str(exc)
    return f"internal error: {type(exc).__name__}: {exc}"


def unavailable_reason(message: str) -> str | None:
    """What our own code said is unavailable (the text after UNAVAILABLE_MARKER), else None."""
    if UNAVAILABLE_MARKER not in message:
        return None
    return message.split(UNAVAILABLE_MARKER, 1)[1]


def is_unavailable_message(message: str) -> bool:
    """Whether an error message says that a model or server is down or coming back (the request may succeed
    later), as opposed to a failure of the request."""
    return any(marker in message for marker in UNAVAILABLE_MESSAGES)


def invalid_request_message(message: str) -> str | None:
    """The user's text of a marked error message (the marker may sit anywhere in Triton's wrapping), else None."""
    if INVALID_REQUEST_MARKER not in message:
        return None
    return message.split(INVALID_REQUEST_MARKER, 1)[1]


def raise_for_error(response: Any, model: str) -> None:
    """Re-raise the error of a BLS InferenceResponse from ``model``: InvalidRequest for the user's mistakes."""
    if not response.has_error():
        return
    message = response.error().message()
    user_message = invalid_request_message(message)
    if user_message is not None:
        raise InvalidRequest(user_message)
    raise RuntimeError(f"{model}: {message}")
