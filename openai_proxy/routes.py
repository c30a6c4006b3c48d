"""The OpenAI endpoints: chat and text completions, the model list; plus health and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from client.triton_vlm import TritonVLMClient
from openai_proxy.chat_schemas import ChatCompletionRequest
from openai_proxy.completion_schemas import CompletionRequest
from openai_proxy.errors import RETRY_AFTER_S, APIError
from openai_proxy.generation import run_generation
from openai_proxy.media_fetch import MediaFetcher
from openai_proxy.messages import choice_sampling, sampling_params, to_hf_messages
from openai_proxy.responses import ChatFormat, TextFormat
from openai_proxy.schemas import ModelCard, ModelList
from openai_proxy.tools import forced_call_constraint
from vlmserve.vlm_settings import VlmSettings

CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"
GENERATION_PATHS = (CHAT_PATH, COMPLETIONS_PATH)
ROUTES = (*GENERATION_PATHS, "/v1/models", "/health", "/metrics")

router = APIRouter()


# Dependencies are coroutines: FastAPI runs plain functions in a thread pool, a thread hand-off per request.
async def triton_client(request: Request) -> TritonVLMClient:
    return request.app.state.triton


async def media_fetcher(request: Request) -> MediaFetcher:
    return request.app.state.media


async def _check_model(model: str, triton: TritonVLMClient) -> VlmSettings:
    """The `vlm` model's settings, once the request's model is the one it serves."""
    served = await triton.settings()
    if model != served.served_model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves "
                            f"`{served.served_model_name}`.", param="model", code="model_not_found")
    return served


@router.post(CHAT_PATH, response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           triton: TritonVLMClient = Depends(triton_client),
                           media: MediaFetcher = Depends(media_fetcher)) -> Response:
    served = await _check_model(body.model, triton)
    mode = body.tool_mode
    messages, urls = to_hf_messages(body.messages, body.tools if mode != "none" else None)
    if len(urls) > served.max_media_per_request:
        raise APIError(400, f"at most {served.max_media_per_request} images and videos per request, "
                            f"got {len(urls)}", param="messages")
    max_tokens = body.max_completion_tokens or body.max_tokens
    constraint = forced_call_constraint(body) or body.output_constraint()
    sampling = sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None, constraint)
    tool_name = body.tool_choice.function.name if mode == "named" else None
    fmt = ChatFormat(served.served_model_name, mode, tool_name, bool(body.logprobs))

    async def start():
        fetched = await media.fetch_all(urls)
        return [triton.generate(messages, fetched, choice_sampling(sampling, i), request_id=f"{fmt.id}-{i}")
                for i in range(body.num_choices)]

    return await run_generation(request, start, fmt, bool(body.stream), body.include_usage)


@router.post(COMPLETIONS_PATH, response_model=None)
async def completions(body: CompletionRequest, request: Request,
                      triton: TritonVLMClient = Depends(triton_client)) -> Response:
    served = await _check_model(body.model, triton)
    sampling = sampling_params(body, body.max_tokens, body.logprobs, body.structured_outputs)
    fmt = TextFormat(served.served_model_name, body.logprobs, body.prompt if body.echo else None)

    async def start():
        return [triton.generate_text(body.prompt, choice_sampling(sampling, i), request_id=f"{fmt.id}-{i}")
                for i in range(body.num_choices)]

    return await run_generation(request, start, fmt, bool(body.stream), body.include_usage)


@router.get("/v1/models")
async def models(request: Request, triton: TritonVLMClient = Depends(triton_client)) -> ModelList:
    served = await triton.settings()
    return ModelList(data=[ModelCard(id=served.served_model_name, created=request.app.state.started,
                                     max_model_len=served.max_model_len or None)])


@router.get("/health")
async def health(triton: TritonVLMClient = Depends(triton_client)) -> JSONResponse:
    if await triton.is_ready():
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unavailable"}, status_code=503, headers={"Retry-After": RETRY_AFTER_S})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return request.app.state.metrics.response()
