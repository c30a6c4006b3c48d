"""The FastAPI app: OpenAI chat completions, model list and health, in front of the Triton `vlm` model."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from client.triton_vlm import TritonVLMClient
from openai_proxy.disconnect import cancel_on_disconnect
from openai_proxy.errors import APIError, install_error_handlers
from openai_proxy.media_fetch import MediaFetcher
from openai_proxy.messages import sampling_params, to_hf_messages
from openai_proxy.responses import CompletionMeta, collect_completion, sse_events
from openai_proxy.schemas import ChatCompletionRequest, ModelCard, ModelList
from openai_proxy.settings import Settings

# Status for a request whose client went away (nginx's convention); nobody reads it.
CLIENT_CLOSED_REQUEST = 499


def triton_client(request: Request) -> TritonVLMClient:
    return request.app.state.triton


def media_fetcher(request: Request) -> MediaFetcher:
    return request.app.state.media


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # gRPC asyncio channels belong to the loop that creates them: make them in the server's loop.
        async with (TritonVLMClient(settings.triton_url) as triton,
                    MediaFetcher(settings.max_media_bytes, settings.media_timeout_s) as media):
            app.state.triton, app.state.media = triton, media
            yield

    app = FastAPI(title="OpenAI-compatible API for the Triton vlm model", lifespan=lifespan)
    install_error_handlers(app)
    started = int(time.time())

    @app.get("/health")
    async def health(triton: TritonVLMClient = Depends(triton_client)) -> JSONResponse:
        ready = await triton.is_ready()
        return JSONResponse({"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.served_model_name, created=started)])

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               triton: TritonVLMClient = Depends(triton_client),
                               media: MediaFetcher = Depends(media_fetcher)) -> Response:
        if body.model != settings.served_model_name:
            raise APIError(404, f"The model `{body.model}` does not exist; this server serves "
                                f"`{settings.served_model_name}`.", param="model", code="model_not_found")
        messages, urls = to_hf_messages(body.messages, settings.default_video_fps)
        sampling = sampling_params(body, settings.default_max_tokens)
        meta = CompletionMeta.new(settings.served_model_name)
        response = Response(status_code=CLIENT_CLOSED_REQUEST)
        async with cancel_on_disconnect(request):
            chunks = triton.generate(messages, await media.fetch_all(urls), sampling, request_id=meta.id)
            if body.stream:
                # Wait for the first chunk, so that what fails before any output (a bad image, a prompt
                # too long) is an HTTP error rather than an event in a 200 stream.
                first = await anext(chunks)
                include_usage = body.stream_options is not None and body.stream_options.include_usage
                response = EventSourceResponse(sse_events(first, chunks, meta, include_usage), sep="\n")
            else:
                response = JSONResponse((await collect_completion(chunks, meta)).model_dump(mode="json"))
        return response

    return app
