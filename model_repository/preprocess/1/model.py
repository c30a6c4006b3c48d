"""Triton `preprocess`: media bytes -> ViT inputs (decode, smart_resize, patchify), as HF's processor does.

Decoding runs here, in this model's own instances, so it never competes with the LLM's thread.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from vlmserve.media import decode_image, decode_video
from vlmserve.preprocessing import VisionPreprocessor
from vlmserve.triton_utils import model_parameters, optional_input, required_input, triton_error
from vlmserve.errors import InvalidRequest
from vlmserve.vision_inputs import vit_inputs

DEFAULT_VIDEO_FPS = 2.0


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.preprocessor = VisionPreprocessor.from_pretrained(params["checkpoint_dir"])
        self.max_image_pixels = int(params.get("max_image_pixels", 64_000_000))
        self.max_video_frames = int(params.get("max_video_frames", 768))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(self._run(request)))
            except Exception as exc:  # one bad request must not fail the others
                responses.append(pb_utils.InferenceResponse(error=triton_error(exc)))
        return responses

    def _run(self, request) -> list:
        data = required_input(request, "MEDIA").reshape(-1)[0]
        kind = required_input(request, "KIND").reshape(-1)[0].decode()
        if kind == "image":
            pixels, grid = self.preprocessor.image(decode_image(data, max_image_pixels=self.max_image_pixels))
        elif kind == "video":
            fps = optional_input(request, "FPS")
            fps = DEFAULT_VIDEO_FPS if fps is None else float(fps.reshape(-1)[0])
            if not 0 < fps <= 60:
                raise InvalidRequest(f"video fps must be in (0, 60], got {fps}")
            video = decode_video(data, fps=fps, max_frames=self.max_video_frames)
            pixels, grid = self.preprocessor.video(video.frames)
        else:
            raise InvalidRequest(f"unknown media kind {kind!r}")
        inputs = vit_inputs(pixels, grid[None, :], self.preprocessor.merge_size)
        return [
            pb_utils.Tensor("PIXEL_VALUES", inputs["pixel_values"]),
            pb_utils.Tensor("POSITION_IDS", inputs["position_ids"]),
            pb_utils.Tensor("SEGMENT_IDS", inputs["segment_ids"]),
            pb_utils.Tensor("GRID_THW", np.asarray(grid, dtype=np.int64)),
        ]
