"""Triton `encode`: a ViT server's entry point. One medium's bytes and resolved options in, grid_thw and
embeddings out (vlmserve.contracts.ENCODE), through this server's `preprocess` and `vit` models.

A thin adapter over vlmserve.vit.encode_service.EncodeService: each request is answered through its
response sender once its medium is encoded, so one instance serves many media at once.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from vlmserve.contracts import ENCODE
from vlmserve.triton_utils import FINAL, bls_infer, medium_input, model_parameters, optional_input, triton_error
from vlmserve.vit.encode_service import EncodeService
from vlmserve.vit.settings import EncodeSettings


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.service = EncodeService(EncodeSettings.from_parameters(params), params, bls_infer)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                data, part = medium_input(request)
                max_tokens = optional_input(request, ENCODE.MAX_TOKENS.name)
                self.service.submit(data, part, None if max_tokens is None else int(max_tokens.reshape(-1)[0]),
                                    lambda future, sender=sender: self._respond(sender, future))
            except Exception as exc:
                self._respond_error(sender, exc)
        return None

    @staticmethod
    def _respond(sender, future) -> None:
        try:
            encoded = future.result()[0]
        except Exception as exc:
            TritonPythonModel._respond_error(sender, exc)
            return
        sender.send(pb_utils.InferenceResponse([
            pb_utils.Tensor(ENCODE.GRID_THW.name, np.asarray(encoded.grid_thw, dtype=np.int64)),
            pb_utils.Tensor(ENCODE.EMBEDS.name, encoded.embeds)]), flags=FINAL)

    @staticmethod
    def _respond_error(sender, exc: Exception) -> None:
        sender.send(pb_utils.InferenceResponse(error=triton_error(exc)), flags=FINAL)

    def finalize(self):
        self.service.shutdown()
