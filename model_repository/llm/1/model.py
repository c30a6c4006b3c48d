"""Triton `llm`: decoupled Python-backend model that streams tokens from the batching engine.

`execute` only hands requests to the engine; one background thread runs engine steps, so
requests that arrive while others decode join the running batch at the next step, and another
sends the responses it produces.
A request with ABORT=true is a control message from `vlm`: it cancels the REQUEST_ID it names.
"""

import json
import queue
import threading
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from transformers import GenerationConfig

from vlmserve.engine import LLMEngine, SamplingParams
from vlmserve.errors import InvalidRequest
from vlmserve.triton_utils import model_parameters, optional_input, required_input, triton_error

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
IDLE_WAIT_S = 0.05


class EngineMetrics:
    """Engine counters published as Triton custom metrics (served on Triton's /metrics).

    Every metric update is a round trip to the Triton process (a whole publish took ~0.5 ms a step
    on a 2-core host, a tenth of a decode step), so while the engine runs they go out at most every
    PUBLISH_INTERVAL_S (scrapes come seconds apart), and once more when it goes idle, so that the
    figures at rest are exact.
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

    def publish(self, engine: LLMEngine, active_requests: int, idle: bool) -> None:
        stats = engine.stats
        gauges = [(self.active, active_requests), (self.max_batch, stats.max_batch_size),
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


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        checkpoint = params["checkpoint_dir"]
        if "torch_threads" in params:
            torch.set_num_threads(int(params["torch_threads"]))
        self.engine = LLMEngine(
            checkpoint,
            device=params.get("device", "cuda" if torch.cuda.is_available() else "cpu"),
            dtype=getattr(torch, params.get("dtype", "float32")),
            max_num_seqs=int(params.get("max_num_seqs", "64")),
            max_num_batched_tokens=int(params.get("max_num_batched_tokens", "2048")),
            block_size=int(params.get("kv_block_size", "16")),
            kv_cache_bytes=int(params["kv_cache_bytes"]) if "kv_cache_bytes" in params else None,
            kv_cache_memory_fraction=(float(params["kv_cache_memory_fraction"])
                                      if "kv_cache_memory_fraction" in params else None),
            enable_prefix_caching=params.get("enable_prefix_caching", "true").lower() == "true",
        )
        eos = GenerationConfig.from_pretrained(checkpoint).eos_token_id
        self.eos_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.metrics = EngineMetrics(self.engine.kv_blocks_total())
        self.incoming: queue.Queue = queue.Queue()
        self.senders: dict[str, object] = {}
        self.running = True
        # Sending a response is a round trip to Triton (~1 ms on a small CPU host); a thread of its
        # own sends them, in order, while the engine already runs the next step.
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self.send_thread = threading.Thread(target=self._send_loop, name="llm-responses", daemon=True)
        self.send_thread.start()
        self.thread.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.incoming.put(self._parse(request, sender))
            except Exception as exc:
                sender.send(pb_utils.InferenceResponse(error=triton_error(exc)), flags=FINAL)
        return None

    def _parse(self, request, sender) -> tuple:
        request_id = required_input(request, "REQUEST_ID").reshape(-1)[0].decode()
        abort = optional_input(request, "ABORT")
        if abort is not None and bool(abort.reshape(-1)[0]):
            sender.send(flags=FINAL)
            return ("abort", request_id)
        try:
            fields = json.loads(required_input(request, "SAMPLING").reshape(-1)[0])
            stop_ids = tuple(fields.pop("stop_token_ids", ())) + self.eos_ids
            sampling = SamplingParams(**fields, stop_token_ids=stop_ids)
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(f"bad sampling parameters: {exc}") from exc
        media = optional_input(request, "MEDIA_EMBEDS")
        keys = optional_input(request, "MEDIA_KEYS")
        return ("add", request_id, sender, dict(
            input_ids=required_input(request, "INPUT_IDS").astype(np.int64).reshape(-1),
            position_ids=required_input(request, "POSITION_IDS").astype(np.int64),
            rope_delta=int(required_input(request, "ROPE_DELTA").reshape(-1)[0]),
            media_embeds=None if media is None or media.size == 0 else media,
            sampling=sampling,
            media_hashes=None if keys is None else [key.decode() for key in keys.reshape(-1)],
        ))

    def _loop(self) -> None:
        while self.running:
            self._admit(block=not self.engine.has_unfinished())
            self._drop_cancelled()
            if not self.engine.has_unfinished():
                self.metrics.publish(self.engine, len(self.senders), idle=True)
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # fail what is running, keep serving
                self._fail_all(exc)
                continue
            self.metrics.publish(self.engine, len(self.senders), idle=False)
            for out in outputs:
                self._send(out)

    def _admit(self, block: bool) -> None:
        try:
            item = self.incoming.get(timeout=IDLE_WAIT_S) if block else self.incoming.get_nowait()
        except queue.Empty:
            return
        while True:
            if item[0] == "abort":
                self._finish(item[1])
            else:
                _, request_id, sender, kwargs = item
                try:
                    self.engine.add_request(request_id, **kwargs)
                    self.senders[request_id] = sender
                except Exception as exc:
                    self.outbox.put((sender, pb_utils.InferenceResponse(error=triton_error(exc)), FINAL))
            try:
                item = self.incoming.get_nowait()
            except queue.Empty:
                return

    def _drop_cancelled(self) -> None:
        for request_id, sender in list(self.senders.items()):
            if sender.is_cancelled():
                self._finish(request_id)

    def _finish(self, request_id: str) -> None:
        """Abort in the engine and close the stream (no-op for requests already finished)."""
        sender = self.senders.pop(request_id, None)
        if sender is None:
            return
        self.engine.abort(request_id)
        self.outbox.put((sender, None, FINAL))  # also when cancelled: without it Triton counts the request in flight

    def _send(self, out) -> None:
        sender = self.senders.get(out.request_id)
        if sender is None:
            return
        tensors = [
            pb_utils.Tensor("TOKEN_IDS", np.asarray([out.token_id], dtype=np.int64)),
            pb_utils.Tensor("FINISH_REASON", np.asarray([out.finish_reason or ""], dtype=np.object_)),
        ]
        self.outbox.put((sender, pb_utils.InferenceResponse(tensors), FINAL if out.finished else 0))
        if out.finished:
            del self.senders[out.request_id]

    def _send_loop(self) -> None:
        while (item := self.outbox.get()) is not None:
            sender, response, flags = item
            try:
                sender.send(response, flags=flags)
            except Exception:  # this request is gone (cancelled and closed); the others go on
                pass

    def _fail_all(self, exc: Exception) -> None:
        for request_id, sender in list(self.senders.items()):
            self.engine.abort(request_id)
            self.outbox.put((sender, pb_utils.InferenceResponse(error=triton_error(exc)), FINAL))
        self.senders.clear()

    def finalize(self):
        self.running = False
        self.thread.join(timeout=10)
        self.outbox.put(None)
        self.send_thread.join(timeout=10)
