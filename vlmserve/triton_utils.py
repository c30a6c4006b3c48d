"""Small helpers for our Triton Python-backend models (imported only inside tritonserver)."""

from __future__ import annotations

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from vlmserve.contracts import encode_error
from vlmserve.errors import InvalidRequest


def model_parameters(args: dict) -> dict[str, str]:
    """The `parameters { key: ... value: { string_value: ... } }` entries of config.pbtxt."""
    params = json.loads(args["model_config"]).get("parameters", {})
    return {key: value["string_value"] for key, value in params.items()}


def optional_input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def required_input(request, name: str) -> np.ndarray:
    value = optional_input(request, name)
    if value is None:
        raise InvalidRequest(f"missing input {name}")
    return value


def triton_error(exc: Exception) -> pb_utils.TritonError:
    """The error a model reports for ``exc``: user mistakes as INVALID_ARG, anything else as INTERNAL.

    Callers read the message, not the code (see vlmserve.contracts.INVALID_REQUEST_MARKER).
    """
    code = pb_utils.TritonError.INVALID_ARG if isinstance(exc, InvalidRequest) else pb_utils.TritonError.INTERNAL
    return pb_utils.TritonError(encode_error(exc), code)


class CancelWatch:
    """Whether a request's client has gone, asked of Triton at most every POLL_S: each question is a round
    trip to the server, and a stream asking at every token doubled the messages it cost."""

    POLL_S = 0.1

    def __init__(self, sender) -> None:
        self.sender = sender
        self.cancelled = False
        self.asked_at = -self.POLL_S

    def __call__(self, now: bool = False) -> bool:
        """The last answer, or a new one when it is older than POLL_S (or `now`)."""
        at = time.monotonic()
        if not self.cancelled and (now or at - self.asked_at >= self.POLL_S):
            self.cancelled, self.asked_at = self.sender.is_cancelled(), at
        return self.cancelled
