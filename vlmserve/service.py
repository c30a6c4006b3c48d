"""The `vlm` model without Triton: one request from its JSON and media bytes to its stream's last delta.

Everything a request does runs on one event loop of ours (a thread, as Triton's vllm_backend runs
vLLM): the input side (vlmserve.inputs: prompt ids, media through the vision models), vLLM's engine
(vlmserve.engine), and the output side (vlmserve.outputs: deltas, sent by the writer). A
generated token crosses one Python process, this one, on its way from vLLM's engine core to Triton.
A client that goes away cancels its request's task wherever it is, which aborts it in the engine.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping

from transformers import AutoTokenizer

from vlmserve.engine.config import EngineConfig
from vlmserve.engine.vllm_engine import VllmEngine
from vlmserve.event_loop import LoopThread
from vlmserve.inputs.processor import InputProcessor
from vlmserve.inputs.request import parse_request
from vlmserve.media.vision import Infer
from vlmserve.outputs.processor import RequestState
from vlmserve.outputs.token_bytes import TokenBytes
from vlmserve.outputs.writer import Outbox, ResponseStream, ResponseWriter
from vlmserve.priority import lower_priority
from vlmserve.vit.pool import VitPool, parse_endpoints
from vlmserve.vlm_settings import VlmSettings

# Threads for the media's model calls (a BLS call blocks a thread until its model answers): enough that the
# images of many requests are looked up, preprocessed and encoded at once.
MODEL_CALL_THREADS = 32


class VlmService:
    def __init__(self, settings: VlmSettings, params: Mapping[str, str], engine_config: EngineConfig,
                 infer: Infer) -> None:
        self._loop_thread = LoopThread("service", MODEL_CALL_THREADS)
        self.loop = self._loop_thread.loop
        self._tasks: set[asyncio.Task] = set()
        # vLLM's engine belongs to the loop it is created on. Its engine core starts in processes of its own
        # meanwhile this one loads the rest: a model that comes back after a crash is ready sooner.
        engine = self._loop_thread.submit(self._create_engine(engine_config))
        tokenizer = AutoTokenizer.from_pretrained(settings.checkpoint_dir)
        self.token_bytes = TokenBytes(tokenizer)
        # ViT servers to send the media to, when the vision side runs on hosts of its own.
        self.vit_pool = (VitPool(parse_endpoints(settings.vit_endpoints), local=infer) if settings.vit_endpoints
                         else None)
        make_inputs = InputProcessor.loader(settings, params, infer, tokenizer, self.vit_pool)
        self.engine = engine.result()
        lower_priority(settings.frontend_niceness)  # the engine's processes, started by now, keep theirs
        self.inputs = make_inputs(self.engine.max_model_len)
        self.writer = ResponseWriter(settings.response_threads)

    def run_on_loop(self, coroutine):
        """Run `coroutine` on the service's loop (where its engine lives) and wait for its result."""
        return self._loop_thread.run(coroutine)

    @staticmethod
    async def _create_engine(config: EngineConfig) -> VllmEngine:
        return VllmEngine(config.engine_args())

    @property
    def active_requests(self) -> int:
        return len(self._tasks)

    def submit(self, raw_request: bytes, media: list[bytes], stream: ResponseStream) -> None:
        """Serve one request (any thread); its responses, or its error, go to `stream`."""
        outbox = self.writer.open(stream)
        self.loop.call_soon_threadsafe(self._start, raw_request, media, outbox)

    def _start(self, raw_request: bytes, media: list[bytes], outbox: Outbox) -> None:
        task = self.loop.create_task(self._serve(raw_request, media, outbox))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # The task's first step is queued already, so a cancel (even of a client gone before this) reaches it
        # inside its try: it aborts the engine request and closes the stream.
        outbox.on_cancel(lambda: self.loop.call_soon_threadsafe(task.cancel))

    async def _serve(self, raw_request: bytes, media: list[bytes], outbox: Outbox) -> None:
        try:
            request = await self.inputs.process(parse_request(raw_request, len(media)), media)
            state = RequestState(len(request.prompt_ids), request.sampling.get("logprobs"), self.token_bytes)
            async for output in self.engine.generate(request, uuid.uuid4().hex):
                delta = state.process(output)
                if delta is not None:
                    outbox.push(delta)
        except asyncio.CancelledError:  # the client has gone: the engine has aborted the request
            outbox.close()
        except Exception as exc:
            outbox.fail(exc)

    def shutdown(self) -> None:
        async def stop() -> None:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.engine.shutdown()
            if self.vit_pool is not None:
                await self.vit_pool.close()

        self.run_on_loop(stop())
        self.writer.shutdown()
        self._loop_thread.stop()
