"""Triton `llm`: decoupled Python-backend model that streams tokens from the LLM engine.

A thin adapter: the engine (vLLM, or the project's native reference engine) and the serving loop
live in vlmserve.llm_serving; `llm/1/engine.json` picks the engine and holds its settings.
A request with ABORT=true is a control message from `vlm`: it cancels the REQUEST_ID it names.
"""

import json
import locale
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from vlmserve.contracts import LLM
from vlmserve.errors import InvalidRequest
from vlmserve.llm_serving.engine_config import EngineConfig
from vlmserve.llm_serving.request import GenerationRequest, TokenChunk, split_media
from vlmserve.llm_serving.server import LLMServer
from vlmserve.triton_utils import optional_input, required_input, triton_error

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class EngineMetrics:
    """Engine counters published as Triton custom metrics (served on Triton's /metrics).

    Every metric update is a round trip to the Triton process (a whole publish took ~0.5 ms on a
    2-core host), so while the engine runs they go out at most every PUBLISH_INTERVAL_S (scrapes
    come seconds apart), and once more when it goes idle, so that the figures at rest are exact.
    """

    PUBLISH_INTERVAL_S = 0.1

    def __init__(self, kv_blocks_total: int):
        self.families = []  # a Metric is only valid while its MetricFamily lives

        def family(name, kind, description):
            self.families.append(pb_utils.MetricFamily(name=name, description=description, kind=kind))
            return self.families[-1].Metric(labels={})

        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self.steps = family("vlm_llm_steps_total", counter, "Engine steps run")
        self.batched = family("vlm_llm_batched_sequences_total", counter, "Sum over steps of sequences in the batch")
        self.tokens = family("vlm_llm_scheduled_tokens_total", counter, "Tokens run through the model")
        self.max_batch = family("vlm_llm_max_batch_size", gauge, "Largest number of sequences in one step")
        self.active = family("vlm_llm_active_requests", gauge, "Requests the engine holds")
        self.running = family("vlm_llm_running_requests", gauge, "Requests prefilling or decoding")
        self.waiting = family("vlm_llm_waiting_requests", gauge, "Requests waiting for a batch slot or KV blocks")
        self.step_tokens = family("vlm_llm_tokens_per_step", gauge, "Tokens run through the model in the last step")
        self.blocks_used = family("vlm_llm_kv_blocks_used", gauge, "KV cache blocks held by requests")
        self.blocks_total = family("vlm_llm_kv_blocks_total", gauge, "KV cache blocks in the pool")
        self.blocks_total.set(kv_blocks_total)
        self.prefix_hits = family("vlm_llm_prefix_cache_hit_tokens_total", counter,
                                  "Prompt tokens whose KV came from the prefix cache")
        self.prefix_queries = family("vlm_llm_prefix_cache_query_tokens_total", counter,
                                     "Prompt tokens looked up in the prefix cache (hit rate: hits / queries)")
        self.preemptions = family("vlm_llm_preemptions_total", counter, "Requests preempted for lack of KV blocks")
        # EngineStats field -> counter; the stats keep running totals, a counter takes the increase.
        # Steps go last: whoever sees the step count move sees the rest of that publish too.
        self._counters = {"batched_sequences": self.batched, "scheduled_tokens": self.tokens,
                          "prefix_cache_hit_tokens": self.prefix_hits,
                          "prefix_cache_query_tokens": self.prefix_queries, "preemptions": self.preemptions,
                          "steps": self.steps}
        self._exported = dict.fromkeys(self._counters, 0)
        self._published_at = 0.0
        self._published: tuple = ()

    def publish(self, server: LLMServer) -> None:
        engine, stats = server.engine, server.engine.stats
        active = server.active_requests
        idle = active == 0 and not engine.has_unfinished()
        gauges = [(self.active, active), (self.max_batch, stats.max_batch_size),
                  (self.running, stats.num_running), (self.waiting, stats.num_waiting),
                  (self.step_tokens, stats.last_num_tokens), (self.blocks_used, engine.kv_blocks_used())]
        totals = {name: getattr(stats, name) for name in self._counters}
        snapshot = (*(value for _, value in gauges), *totals.values())
        now = time.monotonic()
        if snapshot == self._published or (not idle and now - self._published_at < self.PUBLISH_INTERVAL_S):
            return
        self._published_at, self._published = now, snapshot
        for metric, value in gauges:
            metric.set(value)
        for name, total in totals.items():
            if total > self._exported[name]:
                self._counters[name].increment(total - self._exported[name])
                self._exported[name] = total


class TritonStream:
    """A decoupled response sender as the serving loop's ResponseStream."""

    def __init__(self, sender) -> None:
        self.sender = sender

    def send(self, chunk: TokenChunk) -> None:
        if chunk.error is not None:
            self.sender.send(pb_utils.InferenceResponse(error=triton_error(chunk.error)), flags=FINAL)
            return
        tensors = [pb_utils.Tensor(LLM.TOKEN_IDS.name, np.asarray(chunk.token_ids, dtype=np.int64))]
        if chunk.finished:
            tensors.append(pb_utils.Tensor(LLM.FINISH_REASON.name, np.asarray([chunk.finish_reason], dtype=np.object_)))
        if chunk.logprobs is not None:
            tensors += [pb_utils.Tensor(LLM.LOGPROBS.name, chunk.logprobs.logprobs.astype(np.float32)),
                        pb_utils.Tensor(LLM.TOP_LOGPROB_IDS.name, chunk.logprobs.top_ids.astype(np.int64)),
                        pb_utils.Tensor(LLM.TOP_LOGPROBS.name, chunk.logprobs.top_logprobs.astype(np.float32))]
        if chunk.cached_tokens is not None:
            tensors.append(pb_utils.Tensor(LLM.CACHED_TOKENS.name, np.asarray([chunk.cached_tokens], dtype=np.int32)))
        self.sender.send(pb_utils.InferenceResponse(tensors), flags=FINAL if chunk.finished else 0)

    def close(self) -> None:
        self.sender.send(flags=FINAL)  # also when cancelled: without it Triton counts the request in flight

    def is_cancelled(self) -> bool:
        return self.sender.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        # The backend stub runs Python in the C locale; vLLM (through torch's inductor) reads UTF-8 files.
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
        config = EngineConfig.read(Path(args["model_repository"]) / args["model_version"])
        self.server = LLMServer(config.engine_factory())
        self.metrics = EngineMetrics(self.server.engine.kv_blocks_total())
        self.running = True
        self.metrics_thread = threading.Thread(target=self._publish_loop, name="llm-metrics", daemon=True)
        self.metrics_thread.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._handle(request, sender)
            except Exception as exc:
                sender.send(pb_utils.InferenceResponse(error=triton_error(exc)), flags=FINAL)
        return None

    def _handle(self, request, sender) -> None:
        request_id = required_input(request, LLM.REQUEST_ID.name).reshape(-1)[0].decode()
        abort = optional_input(request, LLM.ABORT.name)
        if abort is not None and bool(abort.reshape(-1)[0]):
            self.server.abort(request_id)
            sender.send(flags=FINAL)
            return
        self.server.submit(self._parse(request, request_id), TritonStream(sender))

    def _parse(self, request, request_id: str) -> GenerationRequest:
        try:
            sampling = json.loads(required_input(request, LLM.SAMPLING.name).reshape(-1)[0])
        except ValueError as exc:
            raise InvalidRequest(f"bad sampling parameters: {exc}") from exc
        if not isinstance(sampling, dict):
            raise InvalidRequest("SAMPLING must be a JSON object")
        input_ids = required_input(request, LLM.INPUT_IDS.name).astype(np.int64).reshape(-1)
        keys = optional_input(request, LLM.MEDIA_KEYS.name)
        media = split_media(input_ids, optional_input(request, LLM.MEDIA_EMBEDS.name),
                            [] if keys is None else [key.decode() for key in keys.reshape(-1)],
                            optional_input(request, LLM.MEDIA_GRID_THW.name), self.server.engine.media_token_ids)
        return GenerationRequest(request_id=request_id, input_ids=input_ids, sampling=sampling, media=media)

    def _publish_loop(self) -> None:
        while self.running:
            self.metrics.publish(self.server)
            time.sleep(0.02)

    def finalize(self):
        self.running = False
        self.metrics_thread.join(timeout=5)
        self.server.shutdown()
