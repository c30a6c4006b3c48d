"""The FastAPI app: the OpenAI API in front of the Triton `vlm` model, with its limits and metrics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from client.triton_vlm import TritonVLMClient
from openai_proxy.address_guard import AddressGuard, parse_networks
from openai_proxy.auth import ApiKeyAuth
from openai_proxy.errors import install_error_handlers
from openai_proxy.lifetimes import RequestLifetimes
from openai_proxy.limits import BodySizeLimit, ConcurrencyLimit
from openai_proxy.media_fetch import MediaFetcher
from openai_proxy.metrics import MetricsMiddleware, ProxyMetrics
from openai_proxy.routes import GENERATION_PATHS, ROUTES, router
from openai_proxy.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    """The app; `app.state.lifetimes.drain()` starts a graceful shutdown (the server calls it on SIGTERM)."""
    guard = AddressGuard(settings.allow_private_media_urls, parse_networks(settings.allowed_media_networks))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # gRPC asyncio channels belong to the loop that creates them: make them in the server's loop.
        async with (TritonVLMClient(settings.triton_url) as triton,
                    MediaFetcher(settings.max_media_bytes, settings.media_timeout_s, guard) as media):
            app.state.triton, app.state.media = triton, media
            yield

    app = FastAPI(title="OpenAI-compatible API for the Triton vlm model", lifespan=lifespan)
    app.state.settings = settings
    app.state.started = int(time.time())
    app.state.metrics = metrics = ProxyMetrics()
    app.state.lifetimes = lifetimes = RequestLifetimes(settings.request_timeout_s, settings.shutdown_grace_s)
    install_error_handlers(app)
    app.include_router(router)

    # The last added runs first: count everything, then authenticate, then admit, then read the body.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    limiter_options = {"paths": GENERATION_PATHS, "max_in_flight": settings.max_concurrent_requests,
                       "draining": lambda: lifetimes.draining, "gauge": metrics.in_flight}
    app.add_middleware(ConcurrencyLimit, **limiter_options)
    if settings.api_key:
        app.add_middleware(ApiKeyAuth, api_key=settings.api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=ROUTES)
    return app
