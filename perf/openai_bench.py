"""The reference's concurrency benchmark through the OpenAI API: N requests, W workers, one two-image question.

    python -m perf.openai_bench --base-url http://127.0.0.1:8000/v1 --model tiny-qwen2-vl \
        --image-url URL1 --image-url URL2 --requests 100 --workers 10 --json bench.json --plot bench.png

Prints what the reference prints (total time, QPS, mean latency) and, from the stream, time to first
token, time per output token and request latency (mean, p50/p90/p99) and output tokens/s. Every
request asks the same question about the same images, as the reference does (so a server with a
ViT cache encodes them once). Without --image-url it draws two images and serves them itself from
127.0.0.1; our proxy then needs `--allow-media-network 127.0.0.0/8`.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from perf.media_server import MediaServer
from perf.sessions import Session, run_sessions
from perf.stats import RequestRecord, summarize
from perf.stream_client import Target
from perf.synthetic_data import draw_image

QUESTION = "Are these images different?"


def reference_sessions(image_urls: Sequence[str], requests: int, prefix: str = "reference") -> list[Session]:
    """`requests` one-turn sessions asking the same question about the same images."""
    content = [{"type": "text", "text": QUESTION}]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    return [Session(f"{prefix}-{i}", (content,)) for i in range(requests)]


def run(target: Target, image_urls: Sequence[str], requests: int, workers: int,
        max_tokens: int) -> tuple[list[RequestRecord], float]:
    """Every request's record and the wall time of the whole run."""
    turns, wall_s = run_sessions(target, reference_sessions(image_urls, requests), workers, max_tokens)
    return [t.record for t in turns], wall_s


def print_summary(summary: dict) -> None:
    # The reference's three figures first, under its names.
    print(f"{'total time (s)':>22}: {summary['wall_s']:.3f}")
    print(f"{'QPS':>22}: {summary['qps']:.3f}")
    print(f"{'average latency (s)':>22}: {summary['latency_mean_s']:.3f}")
    for key, value in summary.items():
        print(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="tiny-qwen2-vl")
    parser.add_argument("--image-url", action="append", help="repeat for several images (default: two drawn here)")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, help="write the summary and every request here")
    parser.add_argument("--plot", type=Path, help="write a PNG of the latency distributions here")
    args = parser.parse_args(argv)

    target = Target(args.base_url, args.base_url, args.model)
    with tempfile.TemporaryDirectory() as scratch, MediaServer(Path(scratch)) as media:
        image_urls = args.image_url
        if not image_urls:
            rng = random.Random(0)
            for name in ("a.jpg", "b.jpg"):
                draw_image(rng, Path(scratch) / name, 224, 640)
            image_urls = [media.url("a.jpg"), media.url("b.jpg")]
        records, wall_s = run(target, image_urls, args.requests, args.workers, args.max_tokens)
    summary = summarize(records, wall_s)
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "requests": [asdict(r) for r in records]}, indent=2))
    if args.plot:
        from perf.plots import plot_run  # matplotlib only when a plot is asked for

        plot_run(records, f"{args.requests} requests, {args.workers} workers, {len(image_urls)} images each",
                 args.plot)


if __name__ == "__main__":
    main()
