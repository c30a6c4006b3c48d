"""vLLM's async engine, fed with our ViT's embeddings.

It runs on the event loop of the process that creates it (the `vlm` model's), and starts its engine
core as a process of its own. Media go in as `image_embeds` / `video_embeds` with their grids (vLLM
expands the single pad token per medium and computes M-RoPE itself), and each medium's content key goes
in as vLLM's multimodal UUID, so its prefix cache matches media by key and hashes no tensors. vLLM's own
output processing detokenizes incrementally and matches stop strings (holding back what may start one).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator

import numpy as np
import torch

from vlmserve.engine.request import EngineRequest, check_media
from vlmserve.engine.stats import EngineStats
from vlmserve.errors import InvalidRequest

# Embeddings instead of pixels as input, and the per-step stats our metrics are made of. No multimodal
# processor cache: the media are our ViT's embeddings, which `vit_cache` already holds, and vLLM's cache (4 GiB
# by default) kept a second copy of each in the engine core, which grew with every new image. No multimodal
# profiling: vLLM's own vision tower never runs here, and profiling ran it on the largest video the model
# takes (on a CPU, minutes of the start for Qwen2-VL-2B's tower).
ENGINE_DEFAULTS = {"enable_mm_embeds": True, "disable_log_stats": False, "mm_processor_cache_gb": 0,
                   "skip_mm_profiling": True}

# How vLLM starts its engine core and workers. Its CPU platform sets `spawn` while the config is built, which
# makes each of the two processes import vLLM again (about 10 s each here); forked, they start with what this
# process has imported, as they do by default on every other platform (where vLLM itself still forces spawn once
# CUDA is initialized): a `vlm` model that comes back after a crash serves 30 s sooner. A forked CPU worker
# binds its OpenMP threads to vLLM's cores itself (cpu_worker.py). A start method the user set is kept.
START_METHOD_ENV = "VLLM_WORKER_MULTIPROC_METHOD"
CPU_WORKER = "vlmserve.engine.cpu_worker.ForkedCPUWorker"


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def vllm_prompt(request: EngineRequest, media_token_ids: tuple[int, int]) -> dict:
    """vLLM's prompt dict: one pad token per medium (vLLM expands it), embeddings and grids by modality."""
    runs = check_media(request, media_token_ids)
    ids = request.prompt_ids.tolist()
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
    """vLLM SamplingParams for a request's options (vlmserve.sampling_options names); InvalidRequest for
    values vLLM refuses."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    fields = dict(fields)
    try:
        if fields.get("structured_outputs") is not None:
            fields["structured_outputs"] = StructuredOutputsParams(**fields["structured_outputs"])
        # Deltas: what is ready together goes out together, and a consumer that falls behind gets the tokens
        # of several steps merged into one output.
        return SamplingParams(**fields, output_kind=RequestOutputKind.DELTA)
    except (ValueError, TypeError, VLLMClientError) as exc:
        raise InvalidRequest(f"bad sampling parameters: {exc}") from exc


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
    """AsyncLLM with `args` passed through whole as AsyncEngineArgs (model, dtype, tensor_parallel_size, ...).
    Create it, and call `generate`, on the one event loop that runs it."""

    def __init__(self, args: dict) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        self.stats = EngineStats()
        start_method = os.environ.get(START_METHOD_ENV, "fork")
        if start_method == "fork" and _on_cpu():
            args = {"worker_cls": CPU_WORKER, **args}
        parsed = engine_args({**ENGINE_DEFAULTS, **args})
        config = parsed.create_engine_config()
        os.environ[START_METHOD_ENV] = start_method
        self.engine = AsyncLLM.from_vllm_config(config, stat_loggers=[self._stat_logger_factory()],
                                                enable_log_requests=parsed.enable_log_requests,
                                                disable_log_stats=parsed.disable_log_stats)
        hf_config = self.engine.vllm_config.model_config.hf_config
        self.media_token_ids = (hf_config.image_token_id, hf_config.video_token_id)
        self.kv_blocks_total = int(self.engine.vllm_config.cache_config.num_gpu_blocks or 0)
        self.max_model_len = self.engine.vllm_config.model_config.max_model_len

    def _stat_logger_factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self.stats

        class StatsRecorder(StatLoggerBase):
            """Folds vLLM's per-step stats into the counters our metrics publish."""

            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
                stats.record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return StatsRecorder

    def kv_blocks_used(self) -> int:
        return round(self.stats.kv_usage * self.kv_blocks_total)

    async def generate(self, request: EngineRequest, request_id: str) -> AsyncIterator:
        """vLLM's RequestOutputs (deltas) of `request`; InvalidRequest for what vLLM's input validation refuses
        (e.g. a prompt over max_model_len). Closing the iterator, or cancelling its consumer, aborts the
        request in the engine."""
        from vllm.exceptions import VLLMClientError

        prompt = vllm_prompt(request, self.media_token_ids)
        params = vllm_sampling(request.sampling)
        try:
            async for output in self.engine.generate(prompt, params, request_id):
                yield output
        except (ValueError, VLLMClientError) as exc:
            raise InvalidRequest(str(exc)) from exc

    def shutdown(self) -> None:
        self.engine.shutdown()
        # Dropped now: vLLM's finalizer shuts it down again, which fails once the interpreter is being torn down.
        del self.engine
