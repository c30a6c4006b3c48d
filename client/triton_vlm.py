"""Asyncio client for the Triton `vlm` model: the one place that speaks its gRPC streaming contract.

One `generate` call is one gRPC `ModelStreamInfer` stream carrying one request. The stream is
cancelled when the caller stops consuming the generator (closed or its task cancelled), which
tells Triton to stop generating for that request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from vlmserve.contracts import VLM, invalid_request_message, is_unavailable_message, unavailable_reason
from vlmserve.grpc_channel import CHANNEL_ARGS
from vlmserve.model_parameters import config_parameters
from vlmserve.vlm_settings import VlmSettings


class TritonError(RuntimeError):
    """Triton or the `vlm` model failed, or could not be reached."""


class InvalidRequestError(TritonError):
    """The model rejected the request itself (bad media, bad sampling, prompt too long)."""


class UnavailableError(TritonError):
    """A model, or the server, is down or coming back (a backend process died and is being reloaded, the
    server restarts or stops), or a part the model needs is (no ViT server answers): the same request may
    succeed later. `reason`: the model's own words for the user, when it said what is missing."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


# gRPC statuses of a server that cannot be reached or went away mid-stream.
_UNAVAILABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


@dataclass(frozen=True)
class GenerationChunk:
    """One streamed response: a text delta and the counts so far."""

    text: str
    finish_reason: str | None  # None until the last chunk, then "stop" or "length"
    # The usage counts are on the last chunk; 0 on the others.
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens the prefix cache served
    # When asked for: OpenAI's logprob entries ({token, bytes, logprob, top_logprobs}) of this chunk's tokens.
    logprobs: list[dict] | None = None


def _bytes_input(name: str, values: list[bytes]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_))
    return tensor


def _error(message: str) -> TritonError:
    # A stream response carries only a message, no error code: the contract marks the user's mistakes in it.
    user_message = invalid_request_message(message)
    if user_message is not None:
        return InvalidRequestError(user_message)
    if is_unavailable_message(message):
        return UnavailableError(message, unavailable_reason(message))
    return TritonError(message)


def _transport_error(exc: grpc.RpcError | InferenceServerException) -> TritonError:
    if isinstance(exc, grpc.RpcError):
        unreachable, message = exc.code() in _UNAVAILABLE_CODES, exc.details()
    else:
        unreachable, message = exc.status() in {str(code) for code in _UNAVAILABLE_CODES}, exc.message()
    if unreachable or isinstance(_error(message), UnavailableError):
        return UnavailableError(f"Triton is unavailable: {message}")
    return TritonError(f"Triton stream failed: {message}")


def _one_string(raw: bytes) -> str:
    """The element of a one-element BYTES tensor in Triton's raw form (4-byte length, then the bytes)."""
    return raw[4:].decode("utf-8")


def _utf8(raw: bytes) -> str:
    """A UINT8 tensor of UTF-8 text in Triton's raw form (the bytes themselves)."""
    return raw.decode("utf-8")


def _one_int(raw: bytes) -> int:
    return int.from_bytes(raw[:4], "little", signed=True)


def _chunk(result: grpcclient.InferResult) -> GenerationChunk | None:
    # Read from the response message itself: every token passes here, and the tensors are one element each.
    response = result.get_response()
    raw = dict(zip((output.name for output in response.outputs), response.raw_output_contents))
    text = raw.get(VLM.TEXT.name)
    if text is None:  # the empty final response
        return None
    logprobs = raw.get(VLM.LOGPROBS.name)
    logprobs = None if logprobs is None else json.loads(_utf8(logprobs))
    finish_reason = raw.get(VLM.FINISH_REASON.name)
    if finish_reason is None:
        return GenerationChunk(_utf8(text), None, 0, 0, logprobs=logprobs)
    return GenerationChunk(
        text=_utf8(text),
        finish_reason=_one_string(finish_reason),
        prompt_tokens=_one_int(raw[VLM.PROMPT_TOKENS.name]),
        completion_tokens=_one_int(raw[VLM.COMPLETION_TOKENS.name]),
        cached_tokens=_one_int(raw[VLM.CACHED_TOKENS.name]),
        logprobs=logprobs,
    )


class TritonVLMClient:
    """Streams generations from the `vlm` model. Create it inside the event loop that will use it."""

    def __init__(self, url: str) -> None:
        self._client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
        self._settings: VlmSettings | None = None

    async def __aenter__(self) -> TritonVLMClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.close()

    async def settings(self, timeout_s: float = 10.0) -> VlmSettings:
        """The `vlm` model's settings as the repository set them (its served model name, its limits), read from
        Triton once. UnavailableError while Triton cannot say."""
        if self._settings is None:
            try:
                config = await self._client.get_model_config(VLM.NAME, as_json=True, client_timeout=timeout_s)
            except InferenceServerException as exc:
                raise UnavailableError(f"Triton is unavailable: {exc.message()}") from exc
            self._settings = VlmSettings.from_parameters(config_parameters(config["config"]))
        return self._settings

    async def is_ready(self, timeout_s: float = 5.0) -> bool:
        """True when the server is live and ready and the `vlm` model is ready."""
        try:
            return (await self._client.is_server_live(client_timeout=timeout_s)
                    and await self._client.is_server_ready(client_timeout=timeout_s)
                    and await self._client.is_model_ready(VLM.NAME, client_timeout=timeout_s))
        except InferenceServerException:
            return False

    def generate(self, messages: list[dict], media: list[bytes], sampling: dict,
                 request_id: str) -> AsyncIterator[GenerationChunk]:
        """Stream the answer to HF-form `messages`; `media` holds the bytes of their image/video parts, in order.

        Raises InvalidRequestError for requests the model rejects, TritonError for anything else.
        """
        return self._stream({"messages": messages, "sampling": sampling}, media, request_id)

    def generate_text(self, prompt: str, sampling: dict, request_id: str) -> AsyncIterator[GenerationChunk]:
        """Stream the continuation of a plain-text prompt (tokenized as it is, without the chat template)."""
        return self._stream({"prompt": prompt, "sampling": sampling}, [], request_id)

    async def _stream(self, body: dict, media: list[bytes], request_id: str) -> AsyncIterator[GenerationChunk]:
        try:
            encoded = json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequestError("the request text is not valid Unicode (an unpaired surrogate)") from None
        inputs = [_bytes_input(VLM.REQUEST.name, [encoded])]
        if media:
            inputs.append(_bytes_input(VLM.MEDIA.name, media))
        request = {"model_name": VLM.NAME, "inputs": inputs, "request_id": request_id}

        async def one_request():
            yield request

        # The asyncio client cannot ask for `triton_enable_empty_final_response` (it rejects the reserved
        # "triton_" parameters), so a model that ends with a flags-only response just ends the stream:
        # Triton closes it once our only request is complete.
        responses = self._client.stream_infer(one_request())
        last: GenerationChunk | None = None
        ended = False
        try:
            async for result, error in responses:
                if error is not None:
                    raise _error(error.message())
                chunk = _chunk(result)
                if chunk is not None and chunk.finish_reason is not None:
                    # Held back until Triton has closed the stream: a consumer that stops at the last chunk
                    # would cancel the stream while the server winds it down, and tritonserver 2.51 then
                    # keeps the stream's request, media bytes included, for good.
                    last = chunk
                elif chunk is not None:
                    yield chunk
            ended = True
        except (grpc.RpcError, InferenceServerException) as exc:
            raise _transport_error(exc) from exc
        finally:
            if not ended:
                responses.cancel()  # stops generation when the consumer went away
        if last is None:
            raise TritonError("the vlm model ended its stream without a finish reason")
        yield last
