"""Triton `vit` on CPU: the exported vision tower run with ONNX Runtime.

Same inputs and outputs as the TensorRT plan the GPU target serves under this name, so the
`vlm` model does not care which one it talks to.
"""

import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from vlmserve.triton_utils import model_parameters, required_input, triton_error

INPUTS = ("pixel_values", "position_ids", "segment_ids")


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        options = ort.SessionOptions()
        # A bounded thread count keeps the ViT from starving the LLM of cores.
        options.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(params["onnx_path"], options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feeds = {name: required_input(request, name) for name in INPUTS}
                (embeds,) = self.session.run(["image_embeds"], feeds)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("image_embeds", embeds)]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=triton_error(exc)))
        return responses
