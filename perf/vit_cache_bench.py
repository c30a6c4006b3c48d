"""What the ViT embedding cache saves: time to first token of turns 2 and 3 of a 4-image conversation.

    python -m perf.vit_cache_bench                       # starts two stacks in turn: cache on, cache off

Every conversation sends 4 new noise images with its first turn; turns 2 and 3 resend the whole
history (as chat clients do), so they carry the same 4 images again. With the cache on they are
answered from `vit_cache`; with it off (`--vit-cache-mb 0`) they are decoded and encoded again.
Reported: mean TTFT per turn with the cache on and off, and the on/off ratio for turns 2 and 3;
the answers must be identical either way.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

from client.triton_vlm import TritonVLMClient
from perf.vit_stack import checkpoint_or_tiny, noise_png, report, running_stack, timed_generate

QUESTIONS = ("Compare these four pictures.", "Which one is the brightest?", "Describe the last one again.")


async def conversation(client: TritonVLMClient, media: list[bytes], max_tokens: int) -> tuple[list[float], list[str]]:
    """(TTFT per turn, answer per turn)."""
    messages: list[dict] = []
    ttfts, answers = [], []
    for turn, question in enumerate(QUESTIONS):
        content = [{"type": "image"} for _ in media] if turn == 0 else []
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        stream = await timed_generate(client, messages, media, {"max_tokens": max_tokens, "temperature": 0})
        messages.append({"role": "assistant", "content": stream.text})
        ttfts.append(stream.ttft_s)
        answers.append(stream.text)
    return ttfts, answers


async def measure(url: str, args: argparse.Namespace) -> tuple[list[list[float]], list[list[str]]]:
    async with TritonVLMClient(url) as client:
        await conversation(client, [noise_png(args.image_size, args.image_size, 10_000 + i) for i in range(4)], 4)
        results = []
        for c in range(args.conversations):  # the same seeds on both stacks: the same images
            media = [noise_png(args.image_size, args.image_size, 4 * c + i) for i in range(4)]
            results.append(await conversation(client, media, args.max_tokens))
    return [ttfts for ttfts, _ in results], [answers for _, answers in results]


def run(checkpoint: Path, workdir: Path, cache_mb: float, args: argparse.Namespace):
    with running_stack(checkpoint, workdir, vit_cache_mb=cache_mb) as stack:
        return asyncio.run(measure(stack.triton.grpc_url, args))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="default: the small test checkpoint")
    parser.add_argument("--conversations", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=672, help="square noise images (4 x 576 tokens at 672)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = checkpoint_or_tiny(args.checkpoint, Path(tmp))
        on_ttfts, on_answers = run(checkpoint, Path(tmp) / "cache-on", 512.0, args)
        off_ttfts, off_answers = run(checkpoint, Path(tmp) / "cache-off", 0.0, args)
    on = [statistics.fmean(t[turn] for t in on_ttfts) for turn in range(len(QUESTIONS))]
    off = [statistics.fmean(t[turn] for t in off_ttfts) for turn in range(len(QUESTIONS))]
    result = {
        **{f"ttft_ms_turn{turn + 1}_cache_on": 1000 * on[turn] for turn in range(len(QUESTIONS))},
        **{f"ttft_ms_turn{turn + 1}_cache_off": 1000 * off[turn] for turn in range(len(QUESTIONS))},
        "ratio_turn2_on_over_off": on[1] / off[1],
        "ratio_turn3_on_over_off": on[2] / off[2],
        "answers_identical": on_answers == off_answers,
        "conversations": args.conversations,
        "image_size": args.image_size,
    }
    report(result, args.json)


if __name__ == "__main__":
    main()
