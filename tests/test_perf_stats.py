"""Benchmark statistics on canned data: percentiles, token counting, TPOT, summaries, pooling, the ratio table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from perf.comparison import comparison_rows, markdown_table, pooled_summary, ratio
from perf.stats import RequestRecord, count_completion_tokens, percentile, summarize, time_per_output_token


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
@pytest.mark.parametrize("values", [[3.0], [5.0, 1.0], [0.2, 0.9, 0.4, 0.1, 0.7], list(np.linspace(0, 1, 101) ** 2)])
def test_percentile_matches_numpy_linear(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_known_values():
    latencies = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(latencies, 50) == 3.0
    assert percentile(latencies, 90) == pytest.approx(4.0 + 0.6 * 6.0)  # rank 3.6 between 4 and 10
    assert percentile(latencies, 100) == 10.0
    assert math.isnan(percentile([], 50))


def test_usage_wins_over_chunk_count():
    assert count_completion_tokens(usage_tokens=32, content_chunks=30) == 32  # chunks merged by the server
    assert count_completion_tokens(usage_tokens=0, content_chunks=0) == 0
    assert count_completion_tokens(usage_tokens=None, content_chunks=17) == 17  # server sent no usage


def test_time_per_output_token_excludes_the_first_token():
    assert time_per_output_token(RequestRecord(ttft_s=0.5, latency_s=1.5, completion_tokens=11)) == pytest.approx(0.1)
    assert time_per_output_token(RequestRecord(ttft_s=0.5, latency_s=0.5, completion_tokens=1)) is None
    assert time_per_output_token(RequestRecord(ttft_s=0.5, latency_s=0.5, completion_tokens=0)) is None


def test_summary_on_canned_requests():
    records = [
        RequestRecord(ttft_s=0.1, latency_s=1.1, completion_tokens=11, prompt_tokens=100),  # TPOT 0.1
        RequestRecord(ttft_s=0.2, latency_s=0.6, completion_tokens=5, prompt_tokens=50),  # TPOT 0.1
        RequestRecord(ttft_s=0.3, latency_s=0.3, completion_tokens=1, prompt_tokens=10),  # no TPOT
        RequestRecord(ttft_s=9.0, latency_s=9.0, completion_tokens=0, error="APIError: boom"),
    ]
    s = summarize(records, wall_s=2.0)
    assert (s["requests"], s["errors"]) == (4, 1)
    assert s["qps"] == pytest.approx(1.5)  # 3 successful requests in 2 s
    assert (s["prompt_tokens"], s["output_tokens"]) == (160, 17)
    assert s["output_tokens_per_s"] == pytest.approx(8.5)
    assert s["ttft_p50_s"] == pytest.approx(0.2) and s["ttft_mean_s"] == pytest.approx(0.2)
    assert s["tpot_p99_s"] == pytest.approx(0.1) and s["tpot_mean_s"] == pytest.approx(0.1)
    assert s["latency_p50_s"] == pytest.approx(0.6)
    assert s["latency_p90_s"] == pytest.approx(0.6 + 0.8 * 0.5)
    assert s["latency_mean_s"] == pytest.approx(2.0 / 3)  # the failed request's 9 s is left out


def test_pooled_summary_adds_wall_times():
    first = ([RequestRecord(0.1, 1.0, 10)], 1.0)
    second = ([RequestRecord(0.3, 1.0, 30), RequestRecord(0.2, 1.0, 20)], 3.0)
    s = pooled_summary([first, second])
    assert s["requests"] == 3 and s["wall_s"] == 4.0
    assert s["output_tokens_per_s"] == pytest.approx(60 / 4)
    assert s["ttft_p50_s"] == pytest.approx(0.2)


def test_comparison_rows_and_table():
    ours = {"single-image": {"ttft_p50_s": 0.1, "output_tokens_per_s": 300.0}}
    peer = {"single-image": {"ttft_p50_s": 0.4, "output_tokens_per_s": 100.0}}
    rows = comparison_rows({"ours": ours, "hf": peer}, "ours", "hf")
    assert rows == [{"workload": "single-image",
                     "ours_ttft_p50_s": 0.1, "peer_ttft_p50_s": 0.4, "ratio_ttft_p50_s": 0.25,
                     "ours_output_tokens_per_s": 300.0, "peer_output_tokens_per_s": 100.0,
                     "ratio_output_tokens_per_s": 3.0}]
    table = markdown_table(rows).splitlines()
    assert len(table) == 3 and table[2] == "| single-image | 0.100 | 0.400 | 0.25 | 300.0 | 100.0 | 3.00 |"
    assert math.isnan(ratio(1.0, 0.0))
