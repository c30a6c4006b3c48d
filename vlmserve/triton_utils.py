"""Small helpers for our Triton Python-backend models (imported only inside tritonserver)."""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import triton_python_backend_utils as pb_utils

from vlmserve.contracts import PREPROCESS, VLM, encode_error, raise_for_error
from vlmserve.errors import InvalidRequest
from vlmserve.model_parameters import config_parameters
from vlmserve.outputs.processor import Delta

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def model_parameters(args: dict) -> dict[str, str]:
    """The `parameters { key: ... value: { string_value: ... } }` entries of config.pbtxt."""
    return config_parameters(json.loads(args["model_config"]))


def optional_input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def required_input(request, name: str) -> np.ndarray:
    value = optional_input(request, name)
    if value is None:
        raise InvalidRequest(f"missing input {name}")
    return value


def medium_input(request) -> tuple[bytes, dict]:
    """The medium of a `preprocess` or `encode` request: its bytes, and its part (kind and options) as the
    `vlm` model's messages give it (vlmserve.media.settings.MediaSettings.resolve reads it)."""
    data = required_input(request, PREPROCESS.MEDIA.name).reshape(-1)[0]
    part = {"type": required_input(request, PREPROCESS.KIND.name).reshape(-1)[0].decode()}
    for name, spec in PREPROCESS.OPTIONS.items():
        value = optional_input(request, spec.name)
        if value is not None:
            part[name] = value.reshape(-1)[0].item()
    return data, part


def triton_error(exc: Exception) -> pb_utils.TritonError:
    """The error a model reports for ``exc``: user mistakes as INVALID_ARG, anything else as INTERNAL.

    Callers read the message, not the code (see vlmserve.contracts.INVALID_REQUEST_MARKER).
    """
    code = pb_utils.TritonError.INVALID_ARG if isinstance(exc, InvalidRequest) else pb_utils.TritonError.INTERNAL
    return pb_utils.TritonError(encode_error(exc), code)


async def bls_infer(model: str, inputs: Mapping[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    """One BLS call of `model` (vlmserve.media.encoder.Infer); InvalidRequest for the client's mistakes."""
    response = await pb_utils.InferenceRequest(
        model_name=model, inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()],
        requested_output_names=outputs).async_exec()
    raise_for_error(response, model)
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}


def _utf8(spec, text: str) -> pb_utils.Tensor:
    return pb_utils.Tensor(spec.name, np.frombuffer(text.encode(), dtype=np.uint8))


def _scalar(spec, value) -> pb_utils.Tensor:
    return pb_utils.Tensor(spec.name, np.asarray([value], dtype=spec.numpy_dtype))


class TritonStream:
    """A decoupled response sender as a vlmserve.outputs.writer.ResponseStream: one response per delta, with
    as few tensors as it needs (the finish reason and usage only on the last)."""

    def __init__(self, sender) -> None:
        self.sender = sender

    def send(self, delta: Delta) -> None:
        tensors = [_utf8(VLM.TEXT, delta.text)]
        if delta.logprobs is not None:
            tensors.append(_utf8(VLM.LOGPROBS, json.dumps(delta.logprobs)))
        if delta.finished:
            tensors += [_scalar(VLM.FINISH_REASON, delta.finish_reason.encode()),
                        _scalar(VLM.PROMPT_TOKENS, delta.usage.prompt_tokens),
                        _scalar(VLM.COMPLETION_TOKENS, delta.usage.completion_tokens),
                        _scalar(VLM.CACHED_TOKENS, delta.usage.cached_tokens)]
        self.sender.send(pb_utils.InferenceResponse(tensors), flags=FINAL if delta.finished else 0)

    def fail(self, error: Exception) -> None:
        self.sender.send(pb_utils.InferenceResponse(error=triton_error(error)), flags=FINAL)

    def close(self) -> None:
        self.sender.send(flags=FINAL)  # without the final flag Triton counts the request in flight forever

    def is_cancelled(self) -> bool:
        return self.sender.is_cancelled()
