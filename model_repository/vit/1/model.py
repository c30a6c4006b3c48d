"""Triton `vit` on CPU: the exported vision tower run with ONNX Runtime.

Same inputs and outputs as the TensorRT plan the GPU target serves under this name, so the
`vlm` model does not care which one it talks to.
"""

import triton_python_backend_utils as pb_utils

from vlmserve.triton_utils import model_parameters, required_input, triton_error
from vlmserve.vision_encoder import OnnxVisionEncoder

INPUTS = ("pixel_values", "position_ids", "segment_ids")


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        # A bounded thread count keeps the ViT from starving the LLM of cores.
        self.encoder = OnnxVisionEncoder(params["onnx_path"], int(params.get("intra_op_threads", "1")))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                embeds = self.encoder.run({name: required_input(request, name) for name in INPUTS})
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("image_embeds", embeds)]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=triton_error(exc)))
        return responses
