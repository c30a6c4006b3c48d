"""Benchmark statistics on canned data: percentiles, token counting, TPOT, summaries, answer matching, the table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from perf.comparison import comparison_rows, markdown_table, ratio
from perf.sessions import TurnResult, identical_answers
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


def turn(session: str, round_: int, text: str, error: str | None = None) -> TurnResult:
    return TurnResult(session, round_, RequestRecord(0.1, 1.0, 8, error=error), text)


def test_identical_answers_pair_the_same_request_on_both_servers():
    ours = [turn("a", 0, "x y"), turn("a", 1, "z"), turn("b", 0, "w"), turn("c", 0, "", error="APIError"),
            turn("d", 0, "v")]
    peer = [turn("b", 0, "w"), turn("a", 1, "z!"), turn("a", 0, "x y"), turn("c", 0, "u"),
            turn("d", 0, "", error="APIError")]
    # a/0 and b/0 match, a/1 differs; c and d failed on one side, so they are not compared
    assert identical_answers(ours, peer) == (2, 3)
    assert identical_answers([], peer) == (0, 0)


def summary(qps: float, ttft: float, tpot: float, cpu: float, errors: int = 0) -> dict:
    return {"requests": 10, "errors": errors, "qps": qps, "ttft_p50_s": ttft, "ttft_p99_s": 2 * ttft,
            "tpot_p50_s": tpot, "output_tokens_per_s": 64 * qps, "cpu_outside_engine_s_per_1k_tokens": cpu}


def test_comparison_rows_and_table():
    results = {"reference": {"ours": {"summary": summary(4.0, 0.1, 0.02, 0.3), "identical": 9, "compared": 10},
                             "vLLM": {"summary": summary(2.0, 0.4, 0.01, 0.1, errors=1)}}}
    rows = comparison_rows(results, "vLLM")
    assert [(r["workload"], r["server"]) for r in rows] == [("reference", "ours"), ("reference", "vLLM")]
    assert rows[0]["ratios"] == pytest.approx({"qps": 2.0, "ttft_p50_s": 0.25, "ttft_p99_s": 0.25, "tpot_p50_s": 2.0,
                                               "output_tokens_per_s": 2.0, "cpu_outside_engine_s_per_1k_tokens": 3.0})
    assert "ratios" not in rows[1] and "identical" not in rows[1]
    table = markdown_table(rows).splitlines()
    assert len(table) == 4
    assert table[2] == ("| reference | ours | 10 | 0 | 4.00 (2.00) | 0.100 (0.25) | 0.200 (0.25) | 20.0 (2.00) "
                        "| 256.0 (2.00) | 0.30 (3.00) | 9/10 (90%) |")
    assert table[3] == "| reference | vLLM | 10 | 1 | 2.00 | 0.400 | 0.800 | 10.0 | 128.0 | 0.10 | - |"
    assert math.isnan(ratio(1.0, 0.0))
