"""vLLM's async engine behind the Engine interface, fed with our ViT's embeddings.

As Triton's vllm_backend does, the engine runs in this process on an asyncio loop of its own
(a background thread); its engine core is a process vLLM starts. Media go in as `image_embeds` /
`video_embeds` with their grids (vLLM expands the single pad token per medium and computes M-RoPE
itself), and each medium's content key goes in as vLLM's multimodal UUID, so its prefix cache
matches media by key and hashes no tensors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import numpy as np
import torch

from vlmserve.engine.sampling import SamplingParams as CheckedSampling
from vlmserve.engine.stats import EngineStats
from vlmserve.errors import InvalidRequest
from vlmserve.llm_serving.engine import OutputCallback
from vlmserve.llm_serving.request import GenerationRequest, TokenChunk, TokenLogprobs, check_media

_CHECKED = {field.name for field in dataclasses.fields(CheckedSampling)}
# Embeddings instead of pixels as input, and the per-step stats our metrics are made of. No multimodal
# processor cache: the media are our ViT's embeddings, which `vit_cache` already holds, and vLLM's cache (4 GiB
# by default) kept a second copy of each in the engine core, which grew with every new image.
_ENGINE_DEFAULTS = {"enable_mm_embeds": True, "disable_log_stats": False, "mm_processor_cache_gb": 0}


def vllm_prompt(request: GenerationRequest, media_token_ids: tuple[int, int]) -> dict:
    """vLLM's prompt dict: one pad token per medium (vLLM expands it), embeddings and grids by modality."""
    runs = check_media(request, media_token_ids)
    ids = request.input_ids.tolist()
    for start, length in reversed(runs):
        del ids[start + 1 : start + length]
    prompt: dict = {"prompt_token_ids": ids}
    data, uuids = {}, {}
    for kind in ("image", "video"):
        items = [m for m in request.media if m.kind == kind]
        if items:
            data[kind] = {f"{kind}_embeds": torch.from_numpy(np.concatenate([m.embeds for m in items])),
                          f"{kind}_grid_thw": torch.from_numpy(np.stack([m.grid_thw for m in items]).astype(np.int64))}
            uuids[kind] = [m.key for m in items]
    if data:
        prompt.update(multi_modal_data=data, multi_modal_uuids=uuids)
    return prompt


def vllm_sampling(fields: dict):
    """vLLM SamplingParams for our sampling fields, the common ones checked by the native engine's rules."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    fields = dict(fields)
    try:
        # The options both engines have are checked by the same rules.
        CheckedSampling(**{name: value for name, value in fields.items() if name in _CHECKED})
        if fields.get("structured_outputs") is not None:
            fields["structured_outputs"] = StructuredOutputsParams(**fields["structured_outputs"])
        # Text is made (and stop strings are matched) in the vlm model; deltas let vLLM merge tokens that
        # are ready together into one output.
        return SamplingParams(**fields, detokenize=False, output_kind=RequestOutputKind.DELTA)
    except (ValueError, TypeError, VLLMClientError) as exc:
        raise InvalidRequest(f"bad sampling parameters: {exc}") from exc


def token_logprobs(token_ids: list[int], positions, k: int) -> TokenLogprobs:
    """Our form of vLLM's per-position {token id: Logprob} (the sampled token plus the top k)."""
    n = len(token_ids)
    logprobs = np.zeros(n, np.float32)
    top_ids, top_logprobs = np.zeros((n, k), np.int64), np.full((n, k), -np.inf, np.float32)
    for i, (token, position) in enumerate(zip(token_ids, positions)):
        logprobs[i] = position[token].logprob
        ranked = sorted((lp.rank, tid, lp.logprob) for tid, lp in position.items() if lp.rank is not None and lp.rank <= k)
        for j, (_, tid, value) in enumerate(ranked[:k]):
            top_ids[i, j], top_logprobs[i, j] = tid, value
    return TokenLogprobs(logprobs, top_ids, top_logprobs)


def engine_args(args: dict):
    """AsyncEngineArgs from JSON-able values: a dict for a config object (e.g. structured_outputs_config)
    becomes that object, as vLLM's command line makes it from JSON."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = dict(args)
    for arg in dataclasses.fields(AsyncEngineArgs):
        if isinstance(args.get(arg.name), dict) and arg.default_factory is not dataclasses.MISSING:
            default = arg.default_factory()
            if dataclasses.is_dataclass(default):
                args[arg.name] = type(default)(**args[arg.name])
    return AsyncEngineArgs(**args)


class VllmEngine:
    """AsyncLLM with `args` passed through whole as AsyncEngineArgs (model, dtype, tensor_parallel_size, ...)."""

    def __init__(self, args: dict, on_output: OutputCallback) -> None:
        self.on_output = on_output
        self.stats = EngineStats()
        self.kv_usage = 0.0
        self._requests: dict[str, asyncio.Task | None] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm-engine", daemon=True)
        self.thread.start()
        self.engine = asyncio.run_coroutine_threadsafe(self._create({**_ENGINE_DEFAULTS, **args}), self.loop).result()
        hf_config = self.engine.vllm_config.model_config.hf_config
        self.media_token_ids = (hf_config.image_token_id, hf_config.video_token_id)
        self.num_blocks = int(self.engine.vllm_config.cache_config.num_gpu_blocks or 0)

    async def _create(self, args: dict):
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(engine_args(args), stat_loggers=[self._stat_logger_factory()])

    def _stat_logger_factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class StatsRecorder(StatLoggerBase):
            """Folds vLLM's per-step stats into the counters our metrics publish."""

            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
                engine._record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return StatsRecorder

    def _record(self, scheduler, iteration) -> None:
        stats = self.stats
        if scheduler is not None:
            stats.num_running, stats.num_waiting = scheduler.num_running_reqs, scheduler.num_waiting_reqs
            self.kv_usage = scheduler.kv_cache_usage
            stats.prefix_cache_hit_tokens += scheduler.prefix_cache_stats.hits
            stats.prefix_cache_query_tokens += scheduler.prefix_cache_stats.queries
        if iteration is not None:
            stats.preemptions += iteration.num_preempted_reqs
            tokens = iteration.num_generation_tokens + iteration.prompt_token_stats.computed
            if tokens:
                # Every sequence that sampled a token was in the step's batch, even if it finished in it
                # (and so no longer counts as running).
                stats.record_step(max(stats.num_running, iteration.num_generation_tokens), tokens)

    def add(self, request: GenerationRequest) -> None:
        prompt = vllm_prompt(request, self.media_token_ids)
        params = vllm_sampling(request.sampling)
        if request.request_id in self._requests:
            raise InvalidRequest(f"request id {request.request_id!r} is already running")
        self._requests[request.request_id] = None  # its task, once the loop has started it
        self.loop.call_soon_threadsafe(self._start, request.request_id, prompt, params)

    def _start(self, request_id: str, prompt: dict, params) -> None:
        if request_id in self._requests:  # else aborted before it started
            self._requests[request_id] = self.loop.create_task(self._generate(request_id, prompt, params))

    async def _generate(self, request_id: str, prompt: dict, params) -> None:
        from vllm.exceptions import VLLMClientError

        cached_tokens = None  # sent once, with the first output
        try:
            async for out in self.engine.generate(prompt, params, request_id):
                completion = out.outputs[0]
                finish = (completion.finish_reason or "stop") if out.finished else None
                if completion.token_ids or finish:
                    token_ids = list(completion.token_ids)
                    logprobs = None if params.logprobs is None else token_logprobs(
                        token_ids, completion.logprobs or [], params.logprobs)
                    first = cached_tokens is None
                    cached_tokens = out.num_cached_tokens or 0
                    self.on_output(TokenChunk(request_id, token_ids, finish, logprobs=logprobs,
                                              cached_tokens=cached_tokens if first else None))
        except asyncio.CancelledError:  # aborted: generate() has aborted it in the engine too
            raise
        except (ValueError, VLLMClientError) as exc:  # vLLM's input validation (e.g. a prompt over max_model_len)
            self.on_output(TokenChunk(request_id, [], error=InvalidRequest(str(exc))))
        except Exception as exc:
            self.on_output(TokenChunk(request_id, [], error=exc))
        finally:
            self._requests.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        # On the loop, after the call that starts it: a task is cancelled where it runs.
        asyncio.run_coroutine_threadsafe(self._abort(request_id), self.loop)

    async def _abort(self, request_id: str) -> None:
        task = self._requests.pop(request_id, None)
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # generate() aborts a cancelled request only once it has finished adding it; one cancelled while
        # still being added (a client gone right after the first chunk of a cold start) would run to its end.
        await self.engine.abort(request_id)

    def kv_blocks_total(self) -> int:
        return self.num_blocks

    def kv_blocks_used(self) -> int:
        return round(self.kv_usage * self.num_blocks)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def shutdown(self) -> None:
        for request_id in list(self._requests):
            self.abort(request_id)
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
