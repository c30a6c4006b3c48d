"""Triton `preprocess`: media bytes -> ViT pixel values and grid_thw (decode, smart_resize, patchify).

Decoding runs here, in this model's own instances, so it never competes with the LLM's thread or
blocks the `vlm` event loop. Limits (min/max_pixels, video_min/max/total_pixels, max_frames,
video_fps, max_image_pixels) are model parameters over the checkpoint's values; see
`vlmserve.media_settings`. The `vlm` model packs several media into one `vit` call, so attention
segments and rotary positions are built there.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from vlmserve.errors import InvalidRequest
from vlmserve.media import decode_image, decode_video
from vlmserve.preprocessing import VideoPixelLimits, VisionPreprocessor
from vlmserve.triton_utils import model_parameters, optional_input, required_input, triton_error


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        preprocessor = VisionPreprocessor.from_pretrained(params["checkpoint_dir"])
        self.settings = preprocessor.media_settings().with_parameters(params)
        s = self.settings
        self.preprocessor = preprocessor.with_video_limits(
            VideoPixelLimits(s.video_min_pixels, s.video_max_pixels, s.video_total_pixels))

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
        s = self.settings
        if kind == "image":
            image = decode_image(data, max_image_pixels=s.max_image_pixels)
            pixels, grid = self.preprocessor.image(image, s.min_pixels, s.max_pixels)
        elif kind == "video":
            fps = optional_input(request, "FPS")
            fps = s.fps_for(None if fps is None else float(fps.reshape(-1)[0]))
            video = decode_video(data, fps=fps, max_frames=s.max_frames, max_frame_pixels=s.max_image_pixels)
            pixels, grid = self.preprocessor.video(video.frames)
        else:
            raise InvalidRequest(f"unknown media kind {kind!r}")
        return [
            pb_utils.Tensor("PIXEL_VALUES", np.ascontiguousarray(pixels, dtype=np.float32)),
            pb_utils.Tensor("GRID_THW", np.asarray(grid, dtype=np.int64)),
        ]
