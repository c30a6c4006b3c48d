"""Errors in OpenAI's format, `{"error": {"message", "type", "param", "code"}}`, with fitting HTTP statuses."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from client.triton_vlm import InvalidRequestError, TritonError
from openai_proxy.media_fetch import MediaFetchError

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error to report to the client as it is."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status_code < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code)


def to_api_error(exc: Exception) -> APIError:
    """What the client is told about a failure: its own mistakes as 400, ours as 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, MediaFetchError):
        return APIError(400, exc.message, param="messages")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc))
    if isinstance(exc, TritonError):
        logger.error("Triton request failed: %s", exc)
        return APIError(500, f"inference failed: {exc}")
    logger.error("unexpected error", exc_info=exc)  # a bug: keep the traceback, tell the client little
    return APIError(500, f"internal error: {type(exc).__name__}")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        reason = errors[0].get("ctx", {}).get("error")
        return APIError(400, "The request body is not valid JSON" + (f": {reason}" if reason else ""))
    # Locations start with "body"; the rest is the path of the offending field.
    locations = [[str(part) for part in error["loc"][1:]] for error in errors]
    message = "; ".join(f"{'.'.join(loc) or 'request body'}: {error['msg']}" for loc, error in zip(locations, errors))
    # OpenAI names the top-level request field in `param`.
    return APIError(400, message or "invalid request", param=locations[0][0] if locations and locations[0] else None)


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
