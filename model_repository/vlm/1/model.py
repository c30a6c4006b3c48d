"""Triton `vlm`: the model clients call. It owns the LLM engine (vLLM) and streams each request's text.

A thin adapter over vlmserve.service.VlmService: each request's JSON and media bytes go in, and its
deltas come back through its decoupled response sender. The media go through `preprocess`, `vit_cache`
and `vit` as BLS calls (or to ViT servers over gRPC: vlmserve.vit.pool); the engine's settings are
`vlm/1/engine.json`.
"""

import locale
from pathlib import Path

import triton_python_backend_utils as pb_utils

from vlmserve.contracts import VLM
from vlmserve.engine.config import EngineConfig
from vlmserve.engine.metrics import EngineMetrics
from vlmserve.service import VlmService
from vlmserve.triton_utils import (FINAL, TritonStream, bls_infer, model_parameters, optional_input, required_input,
                                   triton_error)
from vlmserve.vit.pool_metrics import VitPoolMetrics
from vlmserve.vlm_settings import VlmSettings


class TritonPythonModel:
    def initialize(self, args):
        # The backend stub runs Python in the C locale; vLLM (through torch's inductor) reads UTF-8 files.
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
        params = model_parameters(args)
        engine_config = EngineConfig.read(Path(args["model_repository"]) / args["model_version"])
        self.service = VlmService(VlmSettings.from_parameters(params), params, engine_config, bls_infer)
        self.metrics = EngineMetrics(self.service.engine, lambda: self.service.active_requests)
        pool = self.service.vit_pool
        self.pool_metrics = None if pool is None else VitPoolMetrics(pool)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                media = optional_input(request, VLM.MEDIA.name)
                self.service.submit(required_input(request, VLM.REQUEST.name).reshape(-1)[0],
                                    [] if media is None else list(media.reshape(-1)), TritonStream(sender))
            except Exception as exc:
                sender.send(pb_utils.InferenceResponse(error=triton_error(exc)), flags=FINAL)
        return None

    def finalize(self):
        self.metrics.stop()
        if self.pool_metrics is not None:
            self.pool_metrics.stop()
        self.service.shutdown()
