"""A seeded stand-in for InternVL-Chat-V1-2-SFT-Data: same JSONL format, same three conversation shapes.

    python -m perf.synthetic_data OUT_DIR [--per-shape 16] [--seed 0]

writes OUT_DIR/synthetic.jsonl and OUT_DIR/images/*.jpg (drawn with PIL). Shapes, in equal numbers:
  - single image, one round (chart/document QA style: short question, short answer);
  - single image, 2-5 rounds (LLaVA-Instruct style: the image in the first turn, follow-ups in text);
  - 2-4 images in one round ("Image-1: <image>\\nImage-2: <image>\\n..." as InternVL writes them).
Image sides are drawn from [--min-side, --max-side] (COCO-like photos are about 640x480); question
and answer lengths follow the ranges below. The text is English-like filler: the small checkpoint's
answers are noise anyway, and what a benchmark needs are the lengths.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from perf.internvl_data import IMAGE_TAG, Conversation, Round, write_jsonl

JSONL_NAME = "synthetic.jsonl"
QUESTION_WORDS = (6, 30)
ANSWER_WORDS = (10, 80)
MULTI_ROUND = (2, 5)
MULTI_IMAGE = (2, 4)
_WORDS = """the a image picture photo man woman child dog cat car bus street table window tree sky
color red blue green white black left right top bottom front behind next many few two three what
where which how why is are there this that shows holding standing sitting near large small person
building sign text chart value bar line year number highest lowest total document title page""".split()


def filler_text(rng: random.Random, bounds: tuple[int, int], end: str) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(*bounds))]
    return " ".join(words).capitalize() + end


def _scene(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A random scene of shapes: distinct pixels per draw, so no cache can confuse two of them."""
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 12)):
        box = sorted(rng.randrange(size[0]) for _ in range(2)), sorted(rng.randrange(size[1]) for _ in range(2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((box[0][0], box[1][0], box[0][1], box[1][1]), fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def draw_scene(rng: random.Random, path: Path, size: tuple[int, int]) -> None:
    """A JPEG of a random scene of `size` (width, height)."""
    _scene(rng, size).save(path, quality=90)


def draw_image(rng: random.Random, path: Path, min_side: int, max_side: int) -> None:
    """A JPEG of a random scene, its sides drawn from [min_side, max_side]."""
    draw_scene(rng, path, (rng.randint(min_side, max_side), rng.randint(min_side, max_side)))


def draw_video(rng: random.Random, path: Path, size: tuple[int, int], frames: int, fps: int) -> None:
    """An H.264 MP4 of a random scene panning sideways, so consecutive frames differ."""
    scene = np.asarray(_scene(rng, (size[0] * 2, size[1])))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            left = i * size[0] // frames
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(scene[:, left:left + size[0]]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def synthesize(out_dir: Path, per_shape: int, seed: int = 0, min_side: int = 224, max_side: int = 640) -> Path:
    """Write the images and the JSONL file; return the JSONL path."""
    rng = random.Random(seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)

    def images(cid: str, count: int) -> tuple[str, ...]:
        names = tuple(f"images/{cid}-{k}.jpg" for k in range(count))
        for name in names:
            draw_image(rng, out_dir / name, min_side, max_side)
        return names

    def round_(human: str) -> Round:
        return Round(human, filler_text(rng, ANSWER_WORDS, "."))

    conversations = []
    for i in range(per_shape):
        cid = f"single-{seed}-{i}"
        question = f"{IMAGE_TAG}\n{filler_text(rng, QUESTION_WORDS, '?')}"
        conversations.append(Conversation(cid, images(cid, 1), (round_(question),)))
        cid = f"rounds-{seed}-{i}"
        first = round_(f"{IMAGE_TAG}\n{filler_text(rng, QUESTION_WORDS, '?')}")
        later = [round_(filler_text(rng, QUESTION_WORDS, "?")) for _ in range(rng.randint(*MULTI_ROUND) - 1)]
        conversations.append(Conversation(cid, images(cid, 1), (first, *later)))
        cid = f"multi-{seed}-{i}"
        names = images(cid, rng.randint(*MULTI_IMAGE))
        tags = "".join(f"Image-{k + 1}: {IMAGE_TAG}\n" for k in range(len(names)))
        conversations.append(Conversation(cid, names, (round_(tags + filler_text(rng, QUESTION_WORDS, "?")),)))
    path = out_dir / JSONL_NAME
    write_jsonl(path, conversations)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--per-shape", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-side", type=int, default=224)
    parser.add_argument("--max-side", type=int, default=640)
    args = parser.parse_args(argv)
    print(synthesize(args.out_dir, args.per_shape, args.seed, args.min_side, args.max_side))


if __name__ == "__main__":
    main()
