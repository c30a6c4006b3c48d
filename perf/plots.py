"""PNG figures of benchmark runs (matplotlib, from the `bench` extra; imported only by the scripts that plot)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from perf.stats import RequestRecord, time_per_output_token  # noqa: E402


def _cdf(axis, values: Sequence[float], label: str) -> None:
    ordered = sorted(values)
    axis.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post", label=label)


def plot_run(records: Sequence[RequestRecord], title: str, path: Path) -> None:
    """One run: CDFs of TTFT and request latency, and the histogram of time per output token."""
    done = [r for r in records if r.ok]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    _cdf(left, [r.ttft_s for r in done], "time to first token")
    _cdf(left, [r.latency_s for r in done], "request latency")
    left.set(xlabel="seconds", ylabel="fraction of requests", title="latency CDF")
    left.legend()
    right.hist([t * 1000 for t in map(time_per_output_token, done) if t is not None], bins=30)
    right.set(xlabel="ms per output token (after the first)", ylabel="requests", title="time per output token")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_sweep(points: Mapping[str, Sequence[tuple[int, Mapping]]], path: Path) -> None:
    """TTFT p99 against QPS, one line per server, each point labelled with its concurrency.

    `points[server]` holds (concurrency, perf.stats summary) by rising concurrency.
    """
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for server, sweep in points.items():
        qps = [summary["qps"] for _, summary in sweep]
        ttft = [summary["ttft_p99_s"] for _, summary in sweep]
        axis.plot(qps, ttft, marker="o", label=server)
        for (concurrency, _), x, y in zip(sweep, qps, ttft, strict=True):
            axis.annotate(f"c={concurrency}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set(xlabel="QPS", ylabel="TTFT p99 (s)", title="reference workload: concurrency sweep")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_workloads(summaries: Mapping[str, Mapping[str, Mapping]], path: Path) -> None:
    """Bars per workload and server: QPS, TTFT p99, output tokens/s (log scales: the workloads differ by 100x).

    `summaries[workload][server]` is a perf.stats summary.
    """
    workloads = list(summaries)
    servers = list(summaries[workloads[0]])
    width = 0.8 / len(servers)
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [("qps", "QPS, higher is better"), ("ttft_p99_s", "TTFT p99 (s), lower is better"),
              ("output_tokens_per_s", "output tokens/s, higher is better")]
    for panel, (key, label) in zip(axes, panels, strict=True):
        for k, server in enumerate(servers):
            positions = [i + (k - (len(servers) - 1) / 2) * width for i in range(len(workloads))]
            panel.bar(positions, [summaries[w][server][key] for w in workloads], width, label=server)
        panel.set_xticks(range(len(workloads)), workloads, rotation=30, ha="right")
        panel.set_yscale("log")
        panel.set_title(label)
        panel.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
