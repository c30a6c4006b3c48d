"""Does image work stall token generation? Per-token latency of one long text stream, alone and with image traffic.

    python -m perf.vit_parallel_bench                    # starts a stack on the small checkpoint
    python -m perf.vit_parallel_bench --grpc-url 127.0.0.1:8001

Three phases, `--runs` long streams each: the long text-only answer streamed alone; the same
while `--image-workers` clients keep sending requests with `--images` noise images each (new bytes
every time, so the embedding cache cannot help) and one output token; and a control where the same
clients send text-only prompts of the same length at the same request rate instead (the same
prefill load on the LLM, no image work). Reported: the median per-token latency of the long stream
in each phase, the ratio with images / alone, and the ratio with images / with text: the cost of
the image work itself (1.0: the ViT costs the stream nothing). Also the longest pause between two
chunks (a design that ran the ViT in the generation loop would pause the stream for whole image
encodings). On a small CPU host preprocess, ViT and LLM share the same cores, which shows up in
that last ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from client.triton_vlm import TritonVLMClient
from perf.vit_stack import (TimedStream, checkpoint_or_tiny, noise_png, renamed_png, report, running_stack,
                             timed_generate)

LONG_PROMPT = [{"role": "user", "content": "Write a very long story."}]

# One side request: (messages, media) for the n-th request of a phase.
SideRequest = Callable[[int], tuple[list[dict], list[bytes]]]


async def long_stream(client: TritonVLMClient, max_tokens: int) -> TimedStream:
    return await timed_generate(client, LONG_PROMPT, [], {"max_tokens": max_tokens, "temperature": 0})


def image_requests(pictures: list[bytes]) -> SideRequest:
    def make(n: int) -> tuple[list[dict], list[bytes]]:
        media = [renamed_png(picture, n) for picture in pictures]
        content = [{"type": "image"} for _ in media] + [{"type": "text", "text": "Describe."}]
        return [{"role": "user", "content": content}], media
    return make


def text_requests(words: int) -> SideRequest:
    # A number first: every prompt differs from its first block on, so the prefix cache cannot help.
    return lambda n: ([{"role": "user", "content": f"{n} " + "describe " * words}], [])


async def side_traffic(client: TritonVLMClient, make: SideRequest, numbers: itertools.count,
                       stop: asyncio.Event, latencies: list[float], pace_s: float) -> None:
    """Requests back to back, each taking at least `pace_s` (the control keeps the image phase's rate)."""
    while not stop.is_set():
        messages, media = make(next(numbers))
        start = time.perf_counter()
        await timed_generate(client, messages, media, {"max_tokens": 1, "temperature": 0})
        latencies.append(time.perf_counter() - start)
        await asyncio.sleep(pace_s - latencies[-1])


async def text_matching(client: TritonVLMClient, prompt_tokens: int) -> SideRequest:
    """Text requests whose prompts are as long as `prompt_tokens` (calibrated on the served tokenizer)."""
    words = 64
    for _ in range(3):
        messages, _ = text_requests(words)(0)
        got = (await timed_generate(client, messages, [], {"max_tokens": 1})).prompt_tokens
        words = max(1, round(words * prompt_tokens / got))
    return text_requests(words)


async def loaded_phase(client: TritonVLMClient, make: SideRequest, args: argparse.Namespace,
                       numbers: itertools.count, pace_s: float = 0.0) -> tuple[list[TimedStream], list[float]]:
    streams, latencies = [], []
    for _ in range(args.runs):
        stop = asyncio.Event()
        workers = [asyncio.create_task(side_traffic(client, make, numbers, stop, latencies, pace_s))
                   for _ in range(args.image_workers)]
        await asyncio.sleep(args.ramp_s)  # let side work be under way when the stream starts
        streams.append(await long_stream(client, args.max_tokens))
        stop.set()
        await asyncio.gather(*workers)
    return streams, latencies


def per_token_s(streams: list[TimedStream]) -> float:
    return statistics.median(s.per_token_s() for s in streams)


def longest_gap_ms(streams: list[TimedStream]) -> float:
    return 1000 * statistics.median(s.longest_gap_s() for s in streams)


async def measure(url: str, args: argparse.Namespace) -> dict:
    async with TritonVLMClient(url) as client:
        await long_stream(client, 16)  # warm-up: first requests pay one-off costs
        alone = [await long_stream(client, args.max_tokens) for _ in range(args.runs)]
        numbers = itertools.count(1)
        with_images = image_requests([noise_png(args.image_size, args.image_size, seed) for seed in range(args.images)])
        image_prompt_tokens = (await timed_generate(client, *with_images(0), {"max_tokens": 1})).prompt_tokens
        with_text = await text_matching(client, image_prompt_tokens)
        loaded, image_latencies = await loaded_phase(client, with_images, args, numbers)
        control, text_latencies = await loaded_phase(client, with_text, args, numbers,
                                                     pace_s=statistics.fmean(image_latencies))
    return {
        "per_token_ms_alone": 1000 * per_token_s(alone),
        "per_token_ms_with_images": 1000 * per_token_s(loaded),
        "per_token_ms_with_text": 1000 * per_token_s(control),
        "ratio_with_images_over_alone": per_token_s(loaded) / per_token_s(alone),
        "ratio_with_images_over_with_text": per_token_s(loaded) / per_token_s(control),
        "longest_gap_ms_alone": longest_gap_ms(alone),
        "longest_gap_ms_with_images": longest_gap_ms(loaded),
        "longest_gap_ms_with_text": longest_gap_ms(control),
        "image_requests": len(image_latencies),
        "image_request_mean_s": statistics.fmean(image_latencies) if image_latencies else float("nan"),
        "text_requests": len(text_latencies),
        "text_request_mean_s": statistics.fmean(text_latencies) if text_latencies else float("nan"),
        "side_prompt_tokens": image_prompt_tokens,
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
    parser.add_argument("--image-workers", type=int, default=2, help="clients sending side requests")
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
            with running_stack(checkpoint, Path(tmp) / "deploy") as stack:
                result = asyncio.run(measure(stack.triton.grpc_url, args))
    report(result, args.json)


if __name__ == "__main__":
    main()
