"""perf_analyzer `--input-data` files for the `vit` and `vlm` Triton models, made from a checkpoint.

    python -m perf.perf_analyzer_inputs CHECKPOINT OUT_DIR

writes OUT_DIR/vit.json (the vision tower's exact inputs for images of a few sizes, preprocessed
as our `preprocess` model does) and OUT_DIR/vlm.json (chat requests with one distinct image each,
the REQUEST JSON and the image bytes as the BLS model takes them). perf_analyzer cycles through the
entries of a file, so each request has real shapes and real content; once it has been through
vlm.json, the ViT cache knows every image (generate the repository with `--vit-cache-mb 0` to
measure without it).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlmserve.contracts import VLM
from vlmserve.media.preprocessing import VisionPreprocessor
from vlmserve.vit.inputs import vit_inputs

IMAGE_SIZES = ((224, 224), (280, 168), (168, 336))  # width, height: small, so vit.json stays a few MB
QUESTIONS = ("Describe this image.", "What colors are in the picture?", "How many shapes are there?")


def draw(size: tuple[int, int], seed: int) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    canvas = ImageDraw.Draw(image)
    for _ in range(6):
        x0, x1 = sorted(rng.randrange(size[0]) for _ in range(2))
        y0, y1 = sorted(rng.randrange(size[1]) for _ in range(2))
        canvas.rectangle((x0, y0, x1, y1), fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def _json_values(array: np.ndarray) -> list:
    # Floats to 4 decimals: a third of the JSON, and no difference to what is measured.
    return (np.round(array.astype(np.float64), 4) if array.dtype.kind == "f" else array).ravel().tolist()


def serialized_bytes_tensor(element: bytes) -> str:
    """base64 of a one-element BYTES tensor as Triton serializes it: perf_analyzer's `b64` is that, not raw bytes."""
    return base64.b64encode(struct.pack("<I", len(element)) + element).decode("ascii")


def vit_data(checkpoint: Path) -> dict:
    preprocessor = VisionPreprocessor.from_pretrained(checkpoint)
    entries = []
    for seed, size in enumerate(IMAGE_SIZES):
        pixels, grid = preprocessor.image(draw(size, seed))
        tensors = vit_inputs(pixels, np.asarray([grid]), preprocessor.merge_size)  # one image: grid_thw [1, 3]
        entries.append({name: {"content": _json_values(array), "shape": list(array.shape)}
                        for name, array in tensors.items()})
    return {"data": entries}


def vlm_data(max_tokens: int, count: int) -> dict:
    entries = []
    for seed in range(count):
        png = io.BytesIO()
        draw(IMAGE_SIZES[seed % len(IMAGE_SIZES)], seed).save(png, format="PNG")
        question = QUESTIONS[seed % len(QUESTIONS)]
        request = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                   "sampling": {"max_tokens": max_tokens, "temperature": 0}}
        entries.append({VLM.REQUEST.name: {"content": [json.dumps(request)], "shape": [1]},
                        VLM.MEDIA.name: {"b64": serialized_bytes_tensor(png.getvalue()), "shape": [1]}})
    return {"data": entries}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens each vlm request generates at most")
    parser.add_argument("--vlm-requests", type=int, default=16, help="distinct vlm requests (one image each)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "vit.json").write_text(json.dumps(vit_data(args.checkpoint)))
    (args.out_dir / "vlm.json").write_text(json.dumps(vlm_data(args.max_tokens, args.vlm_requests)))
    print(args.out_dir / "vit.json", args.out_dir / "vlm.json")


if __name__ == "__main__":
    main()
