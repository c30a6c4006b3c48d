"""Optional API-key check for the OpenAI routes (`Authorization: Bearer <key>`), as OpenAI answers it."""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from openai_proxy.errors import APIError

PROTECTED_PREFIX = "/v1/"  # /health and /metrics stay open, for probes and scrapers


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX):
            given = dict(scope["headers"]).get(b"authorization")
            if given is None or not secrets.compare_digest(given, self.expected):
                message = ("Incorrect API key provided." if given else
                           "You didn't provide an API key: send it in an `Authorization: Bearer <key>` header.")
                return await APIError(401, message, code="invalid_api_key").response()(scope, receive, send)
        await self.app(scope, receive, send)
