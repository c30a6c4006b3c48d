"""Ask the Triton `vlm` model a question over gRPC and stream the answer to stdout.

    python -m client.chat --url 127.0.0.1:8001 --image cat.jpg "What is in the picture?"
    python -m client.chat --video clip.mp4 --fps 2 --max-tokens 128 "What happens?"
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from pathlib import Path

from client.triton_vlm import TritonError, TritonVLMClient


def build_request(question: str, images: list[Path], video: Path | None, fps: float) -> tuple[list[dict], list[bytes]]:
    """One user turn in HF form, media first (as Qwen2-VL's examples put them), plus their bytes."""
    content: list[dict] = [{"type": "image"} for _ in images]
    media = [path.read_bytes() for path in images]
    if video is not None:
        content.append({"type": "video", "fps": fps})
        media.append(video.read_bytes())
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}], media


async def stream_answer(url: str, messages: list[dict], media: list[bytes], sampling: dict) -> None:
    async with TritonVLMClient(url) as client:
        async for chunk in client.generate(messages, media, sampling, request_id=uuid.uuid4().hex):
            print(chunk.text, end="", flush=True)
    print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m client.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question")
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    parser.add_argument("--image", type=Path, action="append", default=[], metavar="FILE", help="repeatable")
    parser.add_argument("--video", type=Path, metavar="FILE")
    parser.add_argument("--fps", type=float, default=2.0, help="frames sampled per second of video")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, help="default: the server's")
    args = parser.parse_args(argv)

    sampling = {"max_tokens": args.max_tokens}
    if args.temperature is not None:
        sampling["temperature"] = args.temperature
    try:
        messages, media = build_request(args.question, args.image, args.video, args.fps)
        asyncio.run(stream_answer(args.url, messages, media, sampling))
    except (OSError, TritonError) as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:  # asyncio.run has already cancelled the stream
        sys.exit(130)


if __name__ == "__main__":
    main()
