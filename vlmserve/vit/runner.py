"""The exported Qwen2-VL vision tower run by onnxruntime on CPU.

This is what the Triton ``vit`` model runs when no GPU engine is available.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from vlmserve.contracts import VIT
from vlmserve.vit.inputs import vit_inputs


class OnnxVitRunner:
    """Runs ``export/vision_onnx.py``'s model on onnxruntime's CPU provider."""

    def __init__(self, onnx_path: str | Path, intra_op_threads: int | None = None) -> None:
        options = ort.SessionOptions()
        if intra_op_threads is not None:
            # Triton may run several model instances side by side: let the
            # caller cap each one instead of every session taking all cores.
            options.intra_op_num_threads = intra_op_threads
        self._session = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def encode(
        self, pixel_values: np.ndarray, grid_thw: np.ndarray, spatial_merge_size: int
    ) -> np.ndarray:
        """Image embeddings [num_patches / merge**2, hidden_size] float32, in grid order."""
        return self.run(vit_inputs(pixel_values, grid_thw, spatial_merge_size))

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run on ready graph inputs (`pixel_values`, `position_ids`, `segment_ids`), as the `vit` model gets them."""
        (image_embeds,) = self._session.run([VIT.IMAGE_EMBEDS.name], inputs)
        return image_embeds
