"""Triton `vit` on CPU: the exported vision tower run with ONNX Runtime.

Same inputs and outputs as the TensorRT plan the GPU target serves under this name, so the
`vlm` model does not care which one it talks to.
"""

import triton_python_backend_utils as pb_utils

from vlmserve.contracts import VIT
from vlmserve.triton_utils import model_parameters, required_input, triton_error
from vlmserve.vision_encoder import OnnxVisionEncoder


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        # A bounded thread count keeps the ViT from starving the LLM of cores.
        self.encoder = OnnxVisionEncoder(params["onnx_path"], int(params.get("intra_op_threads", "1")))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                embeds = self.encoder.run({spec.name: required_input(request, spec.name) for spec in VIT.inputs})
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(VIT.IMAGE_EMBEDS.name, embeds)]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=triton_error(exc)))
        return responses
