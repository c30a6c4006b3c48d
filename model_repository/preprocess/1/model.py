"""Triton `preprocess`: media bytes -> ViT pixel values and grid_thw (decode, smart_resize, patchify).

Decoding runs here, in this model's own instances, so it never competes with the LLM's thread or
blocks the `vlm` event loop. Limits (min/max_pixels, video_min/max/total_pixels, max_frames,
video_fps, max_image_pixels, max_video_pixels) are model parameters over the checkpoint's values, and
a request's own options (FPS, MIN_PIXELS, MAX_PIXELS, MAX_FRAMES inputs) are clamped into them; see
`vlmserve.media.settings`. The `vlm` model packs several media into one `vit` call, so attention
segments and rotary positions are built there.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from vlmserve.contracts import PREPROCESS
from vlmserve.media.decode import decode_image, decode_video
from vlmserve.media.preprocessing import VisionPreprocessor
from vlmserve.triton_utils import medium_input, model_parameters, triton_error


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        preprocessor = VisionPreprocessor.from_pretrained(params["checkpoint_dir"])
        self.settings = preprocessor.media_settings().with_parameters(params)
        self.preprocessor = preprocessor.with_settings(self.settings)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(self._run(request)))
            except Exception as exc:  # one bad request must not fail the others
                responses.append(pb_utils.InferenceResponse(error=triton_error(exc)))
        return responses

    def _run(self, request) -> list:
        data, part = medium_input(request)
        s = self.settings
        # The `vlm` model sends options it resolved already; resolving again keeps direct callers within limits.
        options = s.resolve(part)
        if options.kind == "image":
            image = decode_image(data, max_image_pixels=s.max_image_pixels)
            pixels, grid = self.preprocessor.image(image, options.min_pixels, options.max_pixels)
        else:
            video = decode_video(data, fps=options.fps, max_frames=options.max_frames,
                                 max_frame_pixels=s.max_image_pixels, max_video_pixels=s.max_video_pixels)
            pixels, grid = self.preprocessor.video(video.frames)
        return [
            pb_utils.Tensor(PREPROCESS.PIXEL_VALUES.name, np.ascontiguousarray(pixels, dtype=np.float32)),
            pb_utils.Tensor(PREPROCESS.GRID_THW.name, np.asarray(grid, dtype=np.int64)),
        ]
