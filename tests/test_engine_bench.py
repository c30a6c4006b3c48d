"""perf/engine_bench.py runs, and the engine and the bare loop it compares against agree."""

from __future__ import annotations

from perf.engine_bench import benchmark
from tests.test_llm_engine import one_torch_thread  # noqa: F401 (autouse fixture)


def test_engine_bench_smoke(tiny_checkpoint):
    result = benchmark(tiny_checkpoint, concurrency=4, max_tokens=6, min_len=4, max_len=40, repeats=1)
    assert result["engine_tokens_per_s"] > 0 and result["bare_tokens_per_s"] > 0
    assert result["ratio"] == result["engine_tokens_per_s"] / result["bare_tokens_per_s"]
    assert result["requests_with_identical_output"] == "4/4"  # a check of the baseline, not a timing
