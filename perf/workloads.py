"""What perf.run_all sends to every server: its workloads, with media drawn afresh for each run.

Every run draws new images and videos from its own seed, so no server meets media it cached in an
earlier run; within a run, caches help only where the workload itself repeats media (the reference
workload's two images, the history of a multi-round conversation), as in serving.

  reference     the reference's benchmark: the same two images and question in every request
  sweep c=N     the reference workload at other concurrencies
  two-images    two new images per request
  multi-round   InternVL-Chat-V1-2-SFT-shaped dialogue: 3 turns, a new image in each, the history
                (earlier images, dataset answers) sent again every turn
  1080p         one new 1920x1080 image per request
  video         one new video per request, sampled at 2 fps (`video_url` with `fps`)
  glue c=N      glue-bound, on the tiny checkpoint (a decode step costs almost nothing, as on a GPU):
                N streams of text prompts at once, each answer exactly `glue_tokens` long (ignore_eos)

Images and video frames have sides that are multiples of 28 (the ViT's patch times the merge size)
within the processor's pixel bounds, so no server resizes them: resamplers differ (ours: PIL, as
transformers' reference processor; vLLM: torchvision), and the bench model's greedy answers are
sensitive enough to tell their pixels apart. The 1920x1080 image is resized by both, as the
workload asks for that size: there the answers compare resamplers as well.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from perf.openai_bench import reference_sessions
from perf.sessions import Session
from perf.synthetic_data import ANSWER_WORDS, QUESTION_WORDS, draw_scene, draw_video, filler_text

PATCH_SIDE = 28  # the ViT's patch side times the merger's 2
IMAGE_PATCH_SIDES = (8, 23)  # 224-644 px a side: COCO-like photos, as InternVL-Chat-V1-2-SFT holds
HD_SIZE = (1920, 1080)
MULTI_ROUND_TURNS = 3
VIDEO_FPS = 2
# 392x308 is within the video processor's pixel bounds (128 to 768 merged patches a frame), so neither
# server resizes the frames. 29 frames at 7 fps (4.14 s): at 2 fps, 8 frames, picked by transformers'
# video-processor rule on both servers.
VIDEO_SIZE, VIDEO_FRAMES, VIDEO_SOURCE_FPS = (14 * PATCH_SIDE, 11 * PATCH_SIDE), 29, 7


@dataclass(frozen=True)
class Workload:
    name: str
    sessions: list[Session]
    workers: int  # sessions in flight at once
    sweep: bool = False  # a point of the reference workload's concurrency sweep
    # Glue-bound: on the tiny checkpoint, answers of exactly `max_tokens` (ignore_eos), from an asyncio client.
    glue_bound: bool = False
    max_tokens: int | None = None  # None: the run's --max-tokens


@dataclass(frozen=True)
class Sizes:
    """How many requests each workload sends and how many run at once."""

    reference_requests: int = 100
    reference_workers: int = 10
    workers: int = 10  # for the workloads with new media
    two_image_requests: int = 30
    multi_round_conversations: int = 10
    hd_requests: int = 6
    video_requests: int = 10
    sweep: tuple[int, ...] = (1, 4, 16, 32)
    sweep_min_requests: int = 8  # each sweep point sends max(this, 2 x concurrency) requests
    glue: tuple[int, ...] = (32, 64)  # concurrencies of the glue-bound workload
    glue_requests_per_stream: int = 3
    glue_tokens: int = 256


class _Drawer:
    """Writes media under `root`/`folder`/, drawn from a generator seeded by the folder's name, and hands
    out the URLs the servers fetch them by."""

    def __init__(self, root: Path, url: Callable[[str], str], folder: str) -> None:
        self.rng = random.Random(folder)
        self.root, self.url, self.folder = root, url, folder
        (root / self.folder).mkdir(parents=True, exist_ok=True)

    def image(self, name: str, size: tuple[int, int] | None = None) -> dict:
        path = f"{self.folder}/{name}.jpg"
        size = size or tuple(PATCH_SIDE * self.rng.randint(*IMAGE_PATCH_SIDES) for _ in range(2))
        draw_scene(self.rng, self.root / path, size)
        return {"type": "image_url", "image_url": {"url": self.url(path)}}

    def video(self, name: str) -> dict:
        path = f"{self.folder}/{name}.mp4"
        draw_video(self.rng, self.root / path, VIDEO_SIZE, VIDEO_FRAMES, VIDEO_SOURCE_FPS)
        return {"type": "video_url", "video_url": {"url": self.url(path), "fps": VIDEO_FPS}}

    def question(self) -> dict:
        return {"type": "text", "text": filler_text(self.rng, QUESTION_WORDS, "?")}

    def answer(self) -> str:
        return filler_text(self.rng, ANSWER_WORDS, ".")


def draw_workloads(root: Path, url: Callable[[str], str], seed: int, sizes: Sizes) -> list[Workload]:
    """Every workload of one run, its media written under `root` (served as `url(relative path)`)."""
    draw = _Drawer(root, url, str(seed))
    pair = [draw.image(name)["image_url"]["url"] for name in ("reference-a", "reference-b")]
    workloads = [Workload("reference", reference_sessions(pair, sizes.reference_requests), sizes.reference_workers,
                          sweep=True)]
    workloads += [Workload(f"sweep c={c}", reference_sessions(pair, max(sizes.sweep_min_requests, 2 * c), f"c{c}"),
                           c, sweep=True) for c in sizes.sweep]
    two = [Session(f"two-{i}", ([draw.image(f"two-{i}-a"), draw.image(f"two-{i}-b"), draw.question()],))
           for i in range(sizes.two_image_requests)]
    rounds = [Session(f"round-{i}", tuple([draw.image(f"round-{i}-{k}"), draw.question()]
                                          for k in range(MULTI_ROUND_TURNS)),
                      tuple(draw.answer() for _ in range(MULTI_ROUND_TURNS - 1)))
              for i in range(sizes.multi_round_conversations)]
    hd = [Session(f"hd-{i}", ([draw.image(f"hd-{i}", HD_SIZE), draw.question()],)) for i in range(sizes.hd_requests)]
    video = [Session(f"video-{i}", ([draw.video(f"video-{i}"), draw.question()],))
             for i in range(sizes.video_requests)]
    return workloads + [Workload("two-images", two, sizes.workers), Workload("multi-round", rounds, sizes.workers),
                        Workload("1080p", hd, sizes.workers), Workload("video", video, sizes.workers)]


def draw_warmup(root: Path, url: Callable[[str], str], seed: int) -> list[Session]:
    """One image request and one video request, drawn apart from the measured media: first requests pay
    for lazy loading and compilation."""
    draw = _Drawer(root, url, f"{seed}-warmup")
    return [Session("warmup-image", ([draw.image("warmup"), draw.question()],)),
            Session("warmup-video", ([draw.video("warmup"), draw.question()],))]


def sweep_points(workloads: Sequence[Workload]) -> list[Workload]:
    """The sweep's workloads by rising concurrency."""
    return sorted((w for w in workloads if w.sweep), key=lambda w: w.workers)


def draw_glue_workloads(seed: int, sizes: Sizes) -> list[Workload]:
    """The glue-bound workload at each concurrency: text prompts drawn from `seed`, a different one per request."""
    rng = random.Random(f"{seed}-glue")
    return [Workload(f"glue c={c}", [Session(f"glue-{c}-{i}", ([{"type": "text", "text": filler_text(
        rng, QUESTION_WORDS, "?")}],)) for i in range(c * sizes.glue_requests_per_stream)], c, glue_bound=True,
                     max_tokens=sizes.glue_tokens) for c in sizes.glue]
