"""Triton `vlm`: the BLS model that ties preprocess -> vit -> llm and streams text.

Each request runs as its own coroutine: media are preprocessed and encoded with async BLS calls
(all parts of a request at once), so ViT work for new requests goes on while the `llm` model keeps
generating for earlier ones.
"""

import asyncio
import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoConfig, AutoTokenizer

from vlmserve.detokenizer import IncrementalDetokenizer, StopStringMatcher, TokenBytes
from vlmserve.errors import INVALID_REQUEST_PREFIX, InvalidRequest
from vlmserve.llm_serving.request import SAMPLING_FIELDS
from vlmserve.media_encoder import Encoded, MediaEncoder
from vlmserve.mrope import mrope_positions
from vlmserve.prompt import PromptBuilder, check_context, media_parts, validate_messages
from vlmserve.triton_utils import model_parameters, optional_input, required_input, triton_error

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
DEFAULT_MAX_TOKENS = 256
LLM_OUTPUTS = ["TOKEN_IDS", "FINISH_REASON", "LOGPROBS", "TOP_LOGPROB_IDS", "TOP_LOGPROBS", "CACHED_TOKENS"]
# JSON has no -inf; OpenAI-compatible servers (vLLM) send this instead.
MIN_LOGPROB = -9999.0


def _tensor(name: str, value, dtype):
    return pb_utils.Tensor(name, np.asarray([value], dtype=dtype))


def _raise_if_error(response) -> None:
    if response.has_error():
        message = response.error().message()
        if INVALID_REQUEST_PREFIX in message:
            raise InvalidRequest(message.split(INVALID_REQUEST_PREFIX, 1)[1])
        raise RuntimeError(message)


def _close(sender) -> None:
    """End a cancelled request's stream: without the final flag Triton counts it in flight forever."""
    try:
        sender.send(flags=FINAL)
    except pb_utils.TritonModelException:  # already closed by Triton
        pass


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        checkpoint = params["checkpoint_dir"]
        self.config = AutoConfig.from_pretrained(checkpoint)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.tokenizer = tokenizer
        self.token_bytes = TokenBytes(tokenizer)
        self.prompts = PromptBuilder(tokenizer, self.config.image_token_id, self.config.video_token_id,
                                     self.config.vision_config.spatial_merge_size)
        text_config = getattr(self.config, "text_config", self.config)
        self.max_model_len = int(params.get("max_model_len", text_config.max_position_embeddings))
        self.max_media = int(params.get("max_media_per_request", "16"))
        self.media = MediaEncoder.from_parameters(params, checkpoint)
        # Decoupled BLS streams are read with blocking next(); these threads keep the event loop free.
        self.stream_readers = ThreadPoolExecutor(max_workers=int(params.get("max_concurrent_streams", "256")))

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
            body = json.loads(required_input(request, "REQUEST").reshape(-1)[0])
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"REQUEST is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise InvalidRequest("REQUEST must be a JSON object")
        sampling = dict(body.get("sampling") or {})
        media = optional_input(request, "MEDIA")
        media = [] if media is None else list(media.reshape(-1))
        max_tokens = int(sampling.get("max_tokens") or DEFAULT_MAX_TOKENS)
        if "prompt" in body:  # a plain-text prompt (text completions) instead of chat messages
            if media or "messages" in body:
                raise InvalidRequest("a request with a prompt takes neither messages nor media")
            input_ids, grids, encoded = self.prompts.raw(body["prompt"]), [], []
            check_context(len(input_ids), max_tokens, self.max_model_len)
        else:
            input_ids, grids, encoded = await self._chat_prompt(body.get("messages"), media, max_tokens)
        image_grids = [g for kind, g in grids if kind == "image"]
        video_grids = [g for kind, g in grids if kind == "video"]
        position_ids, rope_delta = mrope_positions(
            input_ids, np.stack(image_grids) if image_grids else None, np.stack(video_grids) if video_grids else None,
            self.config)
        llm_sampling = {k: sampling[k] for k in SAMPLING_FIELDS if sampling.get(k) is not None}
        llm_sampling["max_tokens"] = max_tokens
        await self._stream(sender, input_ids, position_ids, rope_delta, encoded, llm_sampling,
                           stop=sampling.get("stop") or [])

    async def _chat_prompt(self, messages, media: list, max_tokens: int) -> tuple[np.ndarray, list, list[Encoded]]:
        """Prompt ids of chat messages, with (kind, grid) and the encoding of each medium."""
        messages = validate_messages(messages)
        parts = media_parts(messages)
        if len(parts) != len(media):
            raise InvalidRequest(f"{len(parts)} image/video parts but {len(media)} media inputs")
        if len(media) > self.max_media:
            raise InvalidRequest(f"at most {self.max_media} images/videos per request, got {len(media)}")
        kinds = [part["type"] for part in parts]
        prompt: list[np.ndarray] = []  # the prompt admission built: the grids the ViT encodes fix it

        def admit(grids: list[np.ndarray]) -> None:  # the grids fix the prompt length: reject before ViT work
            prompt[:] = [self.prompts.build(messages, list(zip(kinds, grids)))]
            check_context(len(prompt[0]), max_tokens, self.max_model_len)

        # Deduplicated, cached and batched by vlmserve.media_encoder; it calls admit before any ViT work.
        encoded = await self.media.encode(parts, media, admit)
        return prompt[0], [(part["type"], e.grid_thw) for part, e in zip(parts, encoded)], encoded

    async def _stream(self, sender, input_ids, position_ids, rope_delta, encoded: list[Encoded], sampling,
                      stop) -> None:
        request_id = uuid.uuid4().hex
        inputs = [
            pb_utils.Tensor("REQUEST_ID", np.asarray([request_id], dtype=np.object_)),
            pb_utils.Tensor("INPUT_IDS", input_ids),
            pb_utils.Tensor("POSITION_IDS", position_ids.astype(np.int64)),
            _tensor("ROPE_DELTA", rope_delta, np.int64),
            pb_utils.Tensor("SAMPLING", np.asarray([json.dumps(sampling)], dtype=np.object_)),
        ]
        if encoded:
            inputs.append(pb_utils.Tensor("MEDIA_EMBEDS", np.concatenate([e.embeds for e in encoded])))
            # The media's content keys let the llm's prefix cache match them without hashing embeddings.
            inputs.append(pb_utils.Tensor("MEDIA_KEYS", np.asarray([e.key.encode() for e in encoded],
                                                                   dtype=np.object_)))
            inputs.append(pb_utils.Tensor("MEDIA_GRID_THW", np.stack([e.grid_thw for e in encoded]).astype(np.int64)))
        responses = await pb_utils.InferenceRequest(
            model_name="llm", inputs=inputs, requested_output_names=LLM_OUTPUTS
        ).async_exec(decoupled=True)
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopStringMatcher(stop if isinstance(stop, list) else [stop])
        loop = asyncio.get_running_loop()
        usage = {"prompt_tokens": len(input_ids), "completion_tokens": 0, "cached_tokens": 0}
        logprobs = [] if sampling.get("logprobs") is not None else None  # OpenAI entries not sent yet
        llm_finish, text = "", ""
        try:
            while not (llm_finish or stops.stopped or sender.is_cancelled()):
                response = await loop.run_in_executor(self.stream_readers, next, responses, None)
                if response is None:
                    break
                _raise_if_error(response)
                ids = pb_utils.get_output_tensor_by_name(response, "TOKEN_IDS")
                if ids is None:  # the empty final response
                    continue
                ids = ids.as_numpy().reshape(-1).tolist()
                usage["completion_tokens"] += len(ids)
                cached = pb_utils.get_output_tensor_by_name(response, "CACHED_TOKENS")
                if cached is not None:
                    usage["cached_tokens"] = int(cached.as_numpy()[0])
                if logprobs is not None:
                    logprobs += self._logprob_entries(ids, response)
                llm_finish = pb_utils.get_output_tensor_by_name(response, "FINISH_REASON").as_numpy()[0].decode()
                text = stops.feed(detok.add(ids))
                if (text or logprobs) and not (llm_finish or stops.stopped):
                    self._send(sender, text, "", usage, logprobs)
                    text, logprobs = "", None if logprobs is None else []
        finally:
            if stops.stopped or not llm_finish:  # ended early: free the engine's resources now
                await self._abort(request_id)
        if sender.is_cancelled():
            _close(sender)
            return
        if not stops.stopped:
            text += stops.feed(detok.flush()) + stops.flush()
        finish_reason = "stop" if stops.stopped else (llm_finish or "stop")
        self._send(sender, text, finish_reason, usage, logprobs, final=True)

    def _logprob_entries(self, ids: list[int], response) -> list[dict]:
        """OpenAI's logprob entries (token, bytes, logprob, top_logprobs) of the tokens that have text."""
        def tensor(name):
            return pb_utils.get_output_tensor_by_name(response, name).as_numpy()

        values, top_ids, top_values = tensor("LOGPROBS"), tensor("TOP_LOGPROB_IDS"), tensor("TOP_LOGPROBS")

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

    def _send(self, sender, text: str, finish_reason: str, usage: dict, logprobs: list | None,
              final: bool = False) -> None:
        tensors = [
            pb_utils.Tensor("TEXT", np.asarray([text.encode()], dtype=np.object_)),
            pb_utils.Tensor("FINISH_REASON", np.asarray([finish_reason], dtype=np.object_)),
            _tensor("PROMPT_TOKENS", usage["prompt_tokens"], np.int32),
            _tensor("COMPLETION_TOKENS", usage["completion_tokens"], np.int32),
            _tensor("CACHED_TOKENS", usage["cached_tokens"], np.int32),
        ]
        if logprobs is not None:
            tensors.append(pb_utils.Tensor("LOGPROBS", np.asarray([json.dumps(logprobs).encode()], dtype=np.object_)))
        sender.send(pb_utils.InferenceResponse(tensors), flags=FINAL if final else 0)

    async def _abort(self, request_id: str) -> None:
        responses = await pb_utils.InferenceRequest(
            model_name="llm", requested_output_names=[],
            inputs=[pb_utils.Tensor("REQUEST_ID", np.asarray([request_id], dtype=np.object_)),
                    pb_utils.Tensor("ABORT", np.asarray([True]))]).async_exec(decoupled=True)
        await asyncio.get_running_loop().run_in_executor(self.stream_readers, list, responses)

    def finalize(self):
        self.stream_readers.shutdown(wait=False, cancel_futures=True)
