"""Streaming request figures: what one request measured and what a run of them adds up to.

Pure functions on plain records, so they can be checked on canned data without a server.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class RequestRecord:
    """One streamed completion, timed on the client. Times are seconds from the request's start."""

    ttft_s: float  # first chunk with text; the whole latency when no text came
    latency_s: float  # last byte of the stream
    completion_tokens: int
    prompt_tokens: int = 0
    error: str | None = None  # set when the request failed; failed requests count apart

    @property
    def ok(self) -> bool:
        return self.error is None


def count_completion_tokens(usage_tokens: int | None, content_chunks: int) -> int:
    """The server's own count when it sent usage; otherwise one token per content chunk.

    Servers stream about one token per chunk, but may merge several (a stop string held back, a
    multi-byte character completed), so the chunk count is only the fallback.
    """
    return usage_tokens if usage_tokens is not None else content_chunks


def time_per_output_token(record: RequestRecord) -> float | None:
    """Decode time per token after the first (vLLM's TPOT); None with fewer than two tokens."""
    if record.completion_tokens < 2:
        return None
    return (record.latency_s - record.ttft_s) / (record.completion_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Sequence[float], prefix: str) -> dict[str, float]:
    """Mean and the usual percentiles of `values`, keyed `<prefix>_mean_s`, `<prefix>_p50_s`, ..."""
    figures = {f"{prefix}_mean_s": statistics.fmean(values) if values else math.nan}
    figures.update({f"{prefix}_p{q}_s": percentile(values, q) for q in PERCENTILES})
    return figures


def summarize(records: Sequence[RequestRecord], wall_s: float) -> dict[str, float | int]:
    """Throughput over the run's wall time plus TTFT, TPOT and latency distributions of the successful requests."""
    done = [r for r in records if r.ok]
    output_tokens = sum(r.completion_tokens for r in done)
    tpots = [t for t in map(time_per_output_token, done) if t is not None]
    return {
        "requests": len(records),
        "errors": len(records) - len(done),
        "wall_s": wall_s,
        "qps": len(done) / wall_s,
        "prompt_tokens": sum(r.prompt_tokens for r in done),
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall_s,
        **distribution([r.ttft_s for r in done], "ttft"),
        **distribution(tpots, "tpot"),
        **distribution([r.latency_s for r in done], "latency"),
    }
