"""The project's own engine (vlmserve.engine.LLMEngine) behind the Engine interface: the reference
implementation, and the engine for checkpoints vLLM cannot serve."""

from __future__ import annotations

import threading

import numpy as np
import torch
from transformers import GenerationConfig

from vlmserve.engine import LLMEngine, SamplingParams
from vlmserve.errors import InvalidRequest
from vlmserve.llm_serving.engine import OutputCallback
from vlmserve.llm_serving.request import GenerationRequest, TokenChunk, check_media
from vlmserve.mrope import mrope_positions
from vlmserve.sampling_options import refuse_unless_native

IDLE_WAIT_S = 0.05


def native_sampling(fields: dict, eos_ids: tuple[int, ...]) -> SamplingParams:
    refuse_unless_native(fields)
    fields = dict(fields)
    stop_ids = tuple(fields.pop("stop_token_ids", ())) + (() if fields.pop("ignore_eos", False) else eos_ids)
    try:
        return SamplingParams(**fields, stop_token_ids=stop_ids)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"bad sampling parameters: {exc}") from exc


class NativeEngine:
    """LLMEngine stepped by a thread of its own: requests added while others decode join at the next step.

    `args` are LLMEngine's keyword arguments (dtype as a torch dtype name), plus `torch_threads`.
    """

    def __init__(self, checkpoint: str, args: dict, on_output: OutputCallback) -> None:
        args = dict(args)
        if "torch_threads" in args:
            torch.set_num_threads(int(args.pop("torch_threads")))
        if "dtype" in args:
            args["dtype"] = getattr(torch, args["dtype"])
        args.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        self.engine = LLMEngine(checkpoint, **args)
        eos = GenerationConfig.from_pretrained(checkpoint).eos_token_id
        self.eos_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.media_token_ids = self.engine.media_token_ids
        self.stats = self.engine.stats
        self.on_output = on_output
        self.wake = threading.Event()
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self.thread.start()

    def add(self, request: GenerationRequest) -> None:
        check_media(request, self.media_token_ids)
        media = [m.embeds for m in request.media]
        grids = {kind: [m.grid_thw for m in request.media if m.kind == kind] for kind in ("image", "video")}
        try:
            position_ids, rope_delta = mrope_positions(
                request.input_ids, *(np.stack(grids[kind]) if grids[kind] else None for kind in ("image", "video")),
                self.engine.config)
        except ValueError as exc:  # pad tokens that do not fit the grids
            raise InvalidRequest(str(exc)) from exc
        self.engine.add_request(
            request.request_id, input_ids=request.input_ids, position_ids=position_ids,
            rope_delta=rope_delta, media_embeds=np.concatenate(media) if media else None,
            sampling=native_sampling(request.sampling, self.eos_ids),
            media_hashes=[m.key for m in request.media] if media else None)
        self.wake.set()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self.wake.set()

    def kv_blocks_total(self) -> int:
        return self.engine.kv_blocks_total()

    def kv_blocks_used(self) -> int:
        return self.engine.kv_blocks_used()

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def _loop(self) -> None:
        while self.running:
            if not self.engine.has_unfinished():
                self.wake.wait(IDLE_WAIT_S)
                self.wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # fail what is running, keep serving
                for request_id in self.engine.live_request_ids():
                    self.engine.abort(request_id)
                    self.on_output(TokenChunk(request_id, [], error=exc))
                continue
            for out in outputs:
                self.on_output(TokenChunk(out.request_id, [out.token_id], out.finish_reason if out.finished else None,
                                          cached_tokens=out.num_cached_tokens if out.num_output_tokens == 1 else None))

    def shutdown(self) -> None:
        self.running = False
        self.wake.set()
        self.thread.join(timeout=10)
