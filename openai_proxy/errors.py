"""Errors in OpenAI's format, `{"error": {"message", "type", "param", "code"}}`, with fitting HTTP statuses."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from client.triton_vlm import InvalidRequestError, TritonError, UnavailableError
from openai_proxy.media_fetch import MediaFetchError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "5"  # seconds: a model process comes back in a few (`vlm`, which starts vLLM, in some tens)


class APIError(Exception):
    """An error to report to the client as it is."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status_code < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def model_unavailable(reason: str | None = None) -> APIError:
    # The supervisor brings the model back within seconds; `/health` says not-ready until then. A `reason`:
    # the model said what it misses (no ViT server answers).
    return APIError(503, f"{reason or 'the model is restarting'}; retry the request", code="model_unavailable",
                    headers={"Retry-After": RETRY_AFTER_S})


def to_api_error(exc: Exception) -> APIError:
    """What the client is told about a failure: its own mistakes as 400, ours as 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, MediaFetchError):
        return APIError(400, exc.message, param="messages")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc))
    if isinstance(exc, UnavailableError):
        logger.warning("Triton unavailable: %s", exc)
        return model_unavailable(exc.reason)
    if isinstance(exc, TritonError):
        logger.error("Triton request failed: %s", exc)
        return APIError(500, f"inference failed: {exc}")
    logger.error("unexpected error", exc_info=exc)  # a bug: keep the traceback, tell the client little
    return APIError(500, f"internal error: {type(exc).__name__}")


# Location parts that name a member of a union ("str", "list[...]", "function-after[...]"), not a field.
_UNION_MEMBERS = {"str", "int", "float", "bool", "list", "dict"}


def _location(error: dict) -> list[str]:
    # Locations start with "body"; the rest is the path of the offending field.
    return [str(part) for part in error["loc"][1:] if part not in _UNION_MEMBERS and "[" not in str(part)]


def _message(location: list[str], error: dict) -> str:
    if error["type"] == "extra_forbidden" and len(location) == 1:
        return f"Unrecognized request argument supplied: {location[0]}"  # OpenAI's words
    # A validator's own reason, without pydantic's "Value error, " in front.
    reason = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    return f"{'.'.join(location) or 'request body'}: {reason}"


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    if errors[0]["type"] == "json_invalid":
        reason = errors[0].get("ctx", {}).get("error")
        return APIError(400, "The request body is not valid JSON" + (f": {reason}" if reason else ""))
    # One error, as OpenAI reports them: the deepest, and rather not a union member's plain type mismatch,
    # which is how pydantic reports the members the input was not meant for.
    error = max(errors, key=lambda e: (len(e["loc"]), not e["type"].endswith("_type")))
    location = _location(error)
    # OpenAI names the top-level request field in `param`.
    return APIError(400, _message(location, error), param=location[0] if location else None)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422; OpenAI clients expect 400 for a bad request body.
        return _validation_error(exc).response()

    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    # InvalidRequestError is a TritonError; Exception covers bugs.
    for exc_class in (APIError, MediaFetchError, TritonError, Exception):
        app.add_exception_handler(exc_class, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
