"""Triton `vlm`: the BLS model that ties preprocess -> vit -> llm and streams text.

Each request runs as its own coroutine: media are preprocessed and encoded with async BLS calls
(all parts of a request at once), so ViT work for new requests goes on while the `llm` model keeps
generating for earlier ones. The `llm` stream is then relayed by a thread of the request's own, which
reads its blocking response iterator and sends each text delta on.
"""

import asyncio
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoConfig, AutoTokenizer

from vlmserve.contracts import LLM, VLM, raise_for_error
from vlmserve.detokenizer import IncrementalDetokenizer, StopStringMatcher, TokenBytes
from vlmserve.errors import InvalidRequest
from vlmserve.media.encoder import Encoded, MediaEncoder
from vlmserve.prompt import PromptBuilder, media_parts, validate_messages
from vlmserve.sampling_options import (
    DEFAULT_MAX_TOKENS,
    check_options,
    checkpoint_defaults,
    engine_options,
    max_tokens_for,
)
from vlmserve.triton_utils import CancelWatch, model_parameters, optional_input, required_input, triton_error
from vlmserve.vlm_settings import VlmSettings

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
LLM_OUTPUTS = [spec.name for spec in LLM.outputs]
# JSON has no -inf; OpenAI-compatible servers (vLLM) send this instead.
MIN_LOGPROB = -9999.0


def _tensor(name: str, value, dtype):
    return pb_utils.Tensor(name, np.asarray([value], dtype=dtype))


@dataclass
class Relay:
    """One `llm` stream on its way to the client: what turns its tokens into text, and where it got to."""

    sender: Any
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    usage: dict  # prompt_tokens, completion_tokens, cached_tokens
    logprobs: list | None  # OpenAI entries not sent yet, when asked for
    llm_finish: str = ""
    text: str = ""  # not sent yet
    cancelled: CancelWatch = field(init=False)

    def __post_init__(self) -> None:
        self.cancelled = CancelWatch(self.sender)


def _close(sender) -> None:
    """End a cancelled request's stream: without the final flag Triton counts it in flight forever."""
    try:
        sender.send(flags=FINAL)
    except pb_utils.TritonModelException:  # already closed by Triton
        pass


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        settings = VlmSettings.from_parameters(params)
        checkpoint = settings.checkpoint_dir
        config = AutoConfig.from_pretrained(checkpoint)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.tokenizer = tokenizer
        self.token_bytes = TokenBytes(tokenizer)
        self.prompts = PromptBuilder(tokenizer, config.image_token_id, config.video_token_id,
                                     config.vision_config.spatial_merge_size)
        text_config = getattr(config, "text_config", config)
        self.max_model_len = settings.max_model_len or text_config.max_position_embeddings
        self.max_media = settings.max_media_per_request
        # The server's sampling defaults: the checkpoint's generation config over ours, as vLLM's server does.
        self.sampling_defaults = checkpoint_defaults(checkpoint)
        self.default_max_tokens = self.sampling_defaults.pop("max_tokens", DEFAULT_MAX_TOKENS)
        self.media = MediaEncoder.from_settings(settings, params)
        # Decoupled BLS streams are read with blocking next(); these threads keep the event loop free.
        self.stream_readers = ThreadPoolExecutor(max_workers=settings.max_concurrent_streams)

    async def execute(self, requests):
        await asyncio.gather(*(self._handle(request) for request in requests))
        return None

    async def _handle(self, request) -> None:
        sender = request.get_response_sender()
        try:
            await self._generate(request, sender)
        except Exception as exc:
            if sender.is_cancelled():
                _close(sender)
            else:
                sender.send(pb_utils.InferenceResponse(error=triton_error(exc)), flags=FINAL)

    async def _generate(self, request, sender) -> None:
        try:
            body = json.loads(required_input(request, VLM.REQUEST.name).reshape(-1)[0])
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"REQUEST is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise InvalidRequest("REQUEST must be a JSON object")
        sampling = check_options(body.get("sampling") or {})
        media = optional_input(request, VLM.MEDIA.name)
        media = [] if media is None else list(media.reshape(-1))
        requested = sampling.get("max_tokens")
        if "prompt" in body:  # a plain-text prompt (text completions) instead of chat messages
            if media or "messages" in body:
                raise InvalidRequest("a request with a prompt takes neither messages nor media")
            input_ids, encoded = self.prompts.raw(body["prompt"]), []
            max_tokens = self._max_tokens(requested, len(input_ids))
        else:
            input_ids, encoded, max_tokens = await self._chat_prompt(body.get("messages"), media, requested)
        llm_sampling = {**self.sampling_defaults, **engine_options(sampling), "max_tokens": max_tokens}
        await self._stream(sender, input_ids, encoded, llm_sampling, stop=sampling.get("stop") or [])

    def _max_tokens(self, requested: int | None, prompt_tokens: int) -> int:
        return max_tokens_for(requested, prompt_tokens, self.max_model_len, self.default_max_tokens)

    async def _chat_prompt(self, messages, media: list, requested: int | None) -> tuple[np.ndarray, list[Encoded], int]:
        """Prompt ids of chat messages, the encoding of each medium, and max_tokens."""
        messages = validate_messages(messages)
        parts = media_parts(messages)
        if len(parts) != len(media):
            raise InvalidRequest(f"{len(parts)} image/video parts but {len(media)} media inputs")
        if len(media) > self.max_media:
            raise InvalidRequest(f"at most {self.max_media} images/videos per request, got {len(media)}")
        kinds = [part["type"] for part in parts]
        admitted: list = []  # the prompt and max_tokens admission settled: the grids the ViT encodes fix them

        def admit(grids: list[np.ndarray]) -> None:  # the grids fix the prompt length: reject before ViT work
            prompt = self.prompts.build(messages, list(zip(kinds, grids)))
            admitted[:] = [prompt, self._max_tokens(requested, len(prompt))]

        # Deduplicated, cached and batched by vlmserve.media.encoder; it calls admit before any ViT work.
        encoded = await self.media.encode(parts, media, admit)
        prompt, max_tokens = admitted
        return prompt, encoded, max_tokens

    async def _stream(self, sender, input_ids, encoded: list[Encoded], sampling, stop) -> None:
        request_id = uuid.uuid4().hex
        inputs = [
            pb_utils.Tensor(LLM.REQUEST_ID.name, np.asarray([request_id], dtype=np.object_)),
            pb_utils.Tensor(LLM.INPUT_IDS.name, input_ids),
            pb_utils.Tensor(LLM.SAMPLING.name, np.asarray([json.dumps(sampling)], dtype=np.object_)),
        ]
        if encoded:
            inputs += [
                pb_utils.Tensor(LLM.MEDIA_EMBEDS.name, np.concatenate([e.embeds for e in encoded])),
                pb_utils.Tensor(LLM.MEDIA_KEYS.name, np.asarray([e.key.encode() for e in encoded], dtype=np.object_)),
                pb_utils.Tensor(LLM.MEDIA_GRID_THW.name, np.stack([e.grid_thw for e in encoded]).astype(np.int64)),
            ]
        responses = await pb_utils.InferenceRequest(
            model_name=LLM.NAME, inputs=inputs, requested_output_names=LLM_OUTPUTS
        ).async_exec(decoupled=True)
        relay = Relay(sender, IncrementalDetokenizer(self.tokenizer),
                      StopStringMatcher(stop if isinstance(stop, list) else [stop]),
                      {"prompt_tokens": len(input_ids), "completion_tokens": 0, "cached_tokens": 0},
                      [] if sampling.get("logprobs") is not None else None)
        try:
            # A thread of its own relays the stream: each token then wakes one thread, not a thread and the loop.
            await asyncio.get_running_loop().run_in_executor(self.stream_readers, self._relay, relay, responses)
        finally:
            if relay.stops.stopped or not relay.llm_finish:  # ended early: free the engine's resources now
                await self._abort(request_id)
        if relay.cancelled(now=True):
            _close(sender)
            return
        text = relay.text
        if not relay.stops.stopped:
            text += relay.stops.feed(relay.detok.flush()) + relay.stops.flush()
        finish_reason = "stop" if relay.stops.stopped else (relay.llm_finish or "stop")
        self._send(sender, text, relay.logprobs, finish_reason, relay.usage)

    def _relay(self, relay: Relay, responses) -> None:
        """Send the `llm` stream's tokens on as text deltas, until it ends, a stop string or the client goes;
        what the last response holds stays in `relay`."""
        for response in responses:
            raise_for_error(response, LLM.NAME)
            ids = pb_utils.get_output_tensor_by_name(response, LLM.TOKEN_IDS.name)
            if ids is None:  # the empty final response
                continue
            ids = ids.as_numpy().reshape(-1).tolist()
            relay.usage["completion_tokens"] += len(ids)
            cached = pb_utils.get_output_tensor_by_name(response, LLM.CACHED_TOKENS.name)
            if cached is not None:
                relay.usage["cached_tokens"] = int(cached.as_numpy()[0])
            if relay.logprobs is not None:
                relay.logprobs += self._logprob_entries(ids, response)
            finish = pb_utils.get_output_tensor_by_name(response, LLM.FINISH_REASON.name)
            if finish is not None:
                relay.llm_finish = finish.as_numpy()[0].decode()
            relay.text = relay.stops.feed(relay.detok.add(ids))
            if relay.llm_finish or relay.stops.stopped or relay.cancelled():
                return
            if relay.text or relay.logprobs:
                self._send(relay.sender, relay.text, relay.logprobs)
                relay.text, relay.logprobs = "", None if relay.logprobs is None else []

    def _logprob_entries(self, ids: list[int], response) -> list[dict]:
        """OpenAI's logprob entries (token, bytes, logprob, top_logprobs) of the tokens that have text."""
        def tensor(name):
            return pb_utils.get_output_tensor_by_name(response, name).as_numpy()

        values = tensor(LLM.LOGPROBS.name)
        top_ids, top_values = tensor(LLM.TOP_LOGPROB_IDS.name), tensor(LLM.TOP_LOGPROBS.name)

        def entry(token_id: int, logprob: float) -> dict | None:
            data = self.token_bytes(token_id)
            if data is None:
                return None
            return {"token": data.decode("utf-8", errors="replace"), "bytes": list(data),
                    "logprob": max(float(logprob), MIN_LOGPROB)}

        entries = []
        for i, token_id in enumerate(ids):
            chosen = entry(token_id, values[i])
            if chosen is not None:  # a special token: not in the text either
                tops = (entry(int(t), v) for t, v in zip(top_ids[i], top_values[i]) if v > -np.inf)
                entries.append({**chosen, "top_logprobs": [top for top in tops if top is not None]})
        return entries

    def _send(self, sender, text: str, logprobs: list | None, finish_reason: str | None = None,
              usage: dict | None = None) -> None:
        """A text delta; the finish reason and usage go only in the last response (fewer tensors per token)."""
        tensors = [pb_utils.Tensor(VLM.TEXT.name, np.asarray([text.encode()], dtype=np.object_))]
        if logprobs is not None:
            tensors.append(_tensor(VLM.LOGPROBS.name, json.dumps(logprobs).encode(), np.object_))
        if finish_reason is not None:
            tensors += [
                pb_utils.Tensor(VLM.FINISH_REASON.name, np.asarray([finish_reason], dtype=np.object_)),
                _tensor(VLM.PROMPT_TOKENS.name, usage["prompt_tokens"], np.int32),
                _tensor(VLM.COMPLETION_TOKENS.name, usage["completion_tokens"], np.int32),
                _tensor(VLM.CACHED_TOKENS.name, usage["cached_tokens"], np.int32),
            ]
        sender.send(pb_utils.InferenceResponse(tensors), flags=0 if finish_reason is None else FINAL)

    async def _abort(self, request_id: str) -> None:
        responses = await pb_utils.InferenceRequest(
            model_name=LLM.NAME, requested_output_names=[],
            inputs=[pb_utils.Tensor(LLM.REQUEST_ID.name, np.asarray([request_id], dtype=np.object_)),
                    pb_utils.Tensor(LLM.ABORT.name, np.asarray([True]))]).async_exec(decoupled=True)
        await asyncio.get_running_loop().run_in_executor(self.stream_readers, list, responses)

    def finalize(self):
        self.stream_readers.shutdown(wait=False, cancel_futures=True)
