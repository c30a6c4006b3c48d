"""Triton `vit` on CPU: the exported vision tower run with ONNX Runtime.

Same inputs and outputs as the TensorRT plan the GPU target serves under this name, so the
`vlm` model does not care which one it talks to.
"""

import triton_python_backend_utils as pb_utils

from vlmserve.contracts import VIT
from vlmserve.triton_utils import model_parameters, required_input, triton_error
from vlmserve.vit.runner import OnnxVitRunner
from vlmserve.vit.settings import VitRunnerSettings


class TritonPythonModel:
    def initialize(self, args):
        settings = VitRunnerSettings.from_parameters(model_parameters(args))
        self.runner = OnnxVitRunner(settings.onnx_path, settings.intra_op_threads)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                embeds = self.runner.run({spec.name: required_input(request, spec.name) for spec in VIT.inputs})
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(VIT.IMAGE_EMBEDS.name, embeds)]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=triton_error(exc)))
        return responses
