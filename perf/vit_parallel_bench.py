"""Does image work stall token generation? Per-token latency of one long text stream, alone and with image traffic.

    python -m perf.vit_parallel_bench                    # starts a stack on the small checkpoint
    python -m perf.vit_parallel_bench --grpc-url 127.0.0.1:8001

Phase 1 streams a long text-only answer alone (`--runs` times); phase 2 streams the same answer
while `--image-workers` clients keep sending requests with `--images` new noise images each (new
pixels every time, so the embedding cache cannot help) and one output token. Reported: the
median per-token latency of the long stream in both phases and their ratio (1.0: image traffic
costs the stream nothing), and the longest pause between two chunks (a design that ran the ViT
in the generation loop would pause the stream for whole image encodings). Image requests still add their prompt's prefill to the LLM's steps,
and on a small CPU host preprocess, ViT and LLM share the same cores; both show up in the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

from client.triton_vlm import TritonVLMClient
from perf.vit_stack import TimedStream, checkpoint_or_tiny, noise_png, running_stack, timed_generate

LONG_PROMPT = [{"role": "user", "content": "Write a very long story."}]


async def long_stream(client: TritonVLMClient, max_tokens: int) -> TimedStream:
    return await timed_generate(client, LONG_PROMPT, [], {"max_tokens": max_tokens, "temperature": 0})


async def image_traffic(client: TritonVLMClient, images: int, size: int, seeds: itertools.count,
                        stop: asyncio.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        media = [noise_png(size, size, next(seeds)) for _ in range(images)]
        content = [{"type": "image"} for _ in media] + [{"type": "text", "text": "Describe."}]
        start = time.perf_counter()
        await timed_generate(client, [{"role": "user", "content": content}], media,
                             {"max_tokens": 1, "temperature": 0})
        latencies.append(time.perf_counter() - start)


async def measure(url: str, args: argparse.Namespace) -> dict:
    async with TritonVLMClient(url) as client:
        await long_stream(client, 16)  # warm-up: first requests pay one-off costs
        alone = [await long_stream(client, args.max_tokens) for _ in range(args.runs)]
        loaded, latencies, seeds = [], [], itertools.count(1)
        for _ in range(args.runs):
            stop = asyncio.Event()
            workers = [asyncio.create_task(image_traffic(client, args.images, args.image_size, seeds, stop, latencies))
                       for _ in range(args.image_workers)]
            await asyncio.sleep(args.ramp_s)  # let image work be under way when the stream starts
            loaded.append(await long_stream(client, args.max_tokens))
            stop.set()
            await asyncio.gather(*workers)
    alone_s = statistics.median(s.per_token_s() for s in alone)
    loaded_s = statistics.median(s.per_token_s() for s in loaded)
    return {
        "per_token_ms_alone": 1000 * alone_s,
        "per_token_ms_with_images": 1000 * loaded_s,
        "ratio_with_over_without": loaded_s / alone_s,
        "longest_gap_ms_alone": 1000 * statistics.median(s.longest_gap_s() for s in alone),
        "longest_gap_ms_with_images": 1000 * statistics.median(s.longest_gap_s() for s in loaded),
        "image_requests": len(latencies),
        "image_request_mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "images_per_request": args.images,
        "image_size": args.image_size,
        "long_stream_tokens": args.max_tokens,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc-url", help="an already running server (default: start one)")
    parser.add_argument("--checkpoint", type=Path, help="default: the small test checkpoint")
    parser.add_argument("--max-tokens", type=int, default=1000, help="length of the long stream")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image-workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=2, help="images per image request")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--ramp-s", type=float, default=0.5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    if args.grpc_url:
        result = asyncio.run(measure(args.grpc_url, args))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = checkpoint_or_tiny(args.checkpoint, Path(tmp))
            with running_stack(checkpoint, Path(tmp) / "deploy", llm_threads=1) as stack:
                result = asyncio.run(measure(stack.triton.grpc_url, args))
    for key, value in result.items():
        print(f"{key:>28}: {value:.3f}" if isinstance(value, float) else f"{key:>28}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
