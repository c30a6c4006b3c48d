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


def plot_comparison(summaries: Mapping[str, Mapping[str, Mapping]], by_round: Mapping[str, Mapping[int, float]],
                    path: Path) -> None:
    """Ours against the peer: TTFT p50 and output tokens/s per workload, and multi-round TTFT by round.

    `summaries[target][workload]` is a perf.stats summary; `by_round[target]` the multi-round TTFT p50 by round.
    """
    targets = list(summaries)
    workloads = list(summaries[targets[0]])
    width = 0.8 / len(targets)
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for panel, (key, label) in zip(axes[:2], [("ttft_p50_s", "TTFT p50 (s), lower is better"),
                                              ("output_tokens_per_s", "output tokens/s, higher is better")],
                                 strict=True):
        for k, target in enumerate(targets):
            positions = [i + (k - (len(targets) - 1) / 2) * width for i in range(len(workloads))]
            panel.bar(positions, [summaries[target][w][key] for w in workloads], width, label=target)
        panel.set_xticks(range(len(workloads)), workloads)
        panel.set_title(label)
        panel.legend()
    for target, rounds in by_round.items():
        axes[2].plot([r + 1 for r in rounds], list(rounds.values()), marker="o", label=target)
    axes[2].set(xlabel="round", ylabel="TTFT p50 (s)", title="multi-round: TTFT by round")
    axes[2].xaxis.get_major_locator().set_params(integer=True)
    axes[2].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
