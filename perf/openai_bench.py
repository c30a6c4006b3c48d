"""The reference's concurrency benchmark through the OpenAI API: N requests, W workers, two images each.

    python -m perf.openai_bench --base-url http://127.0.0.1:8000/v1 --model tiny-qwen2-vl \
        --image-url URL1 --image-url URL2 --requests 100 --workers 10

Prints total time, QPS, mean latency (as the reference does) plus time to first token and output
tokens/s; `--json` writes the figures to a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from openai import OpenAI


@dataclass
class RequestResult:
    latency_s: float
    ttft_s: float
    completion_tokens: int


def one_request(client: OpenAI, model: str, image_urls: list[str], max_tokens: int) -> RequestResult:
    content = [{"type": "text", "text": "Are these images different?"}]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    start = time.perf_counter()
    ttft, tokens = None, 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                            stream=True, stream_options={"include_usage": True},
                                            max_completion_tokens=max_tokens, temperature=0.1)
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - start
    return RequestResult(latency, latency if ttft is None else ttft, tokens)


def summarize(results: list[RequestResult], wall_s: float) -> dict[str, float]:
    latencies = [r.latency_s for r in results]
    return {
        "requests": len(results),
        "total_time_s": wall_s,
        "qps": len(results) / wall_s,
        "mean_latency_s": statistics.fmean(latencies),
        "mean_ttft_s": statistics.fmean(r.ttft_s for r in results),
        "output_tokens_per_s": sum(r.completion_tokens for r in results) / wall_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="tiny-qwen2-vl")
    parser.add_argument("--image-url", action="append", required=True, help="repeat for several images")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args(argv)

    client = OpenAI(base_url=args.base_url, api_key="EMPTY", max_retries=0)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(lambda _: one_request(client, args.model, args.image_url, args.max_tokens),
                                range(args.requests)))
    summary = summarize(results, time.perf_counter() - start)
    for key, value in summary.items():
        print(f"{key:>22}: {value:.3f}" if isinstance(value, float) else f"{key:>22}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "requests": [asdict(r) for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
