"""Ours against a peer: pooling repeated runs and the ratio table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from perf.stats import RequestRecord, summarize

# summary key, column label, decimals
RATIO_COLUMNS = (("ttft_p50_s", "TTFT p50 (s)", 3), ("output_tokens_per_s", "output tokens/s", 1))


def pooled_summary(runs: Sequence[tuple[Sequence[RequestRecord], float]]) -> dict:
    """One summary over several runs of a workload: their records together over their summed wall time."""
    return summarize([r for records, _ in runs for r in records], sum(wall for _, wall in runs))


def ratio(ours: float, peer: float) -> float:
    return ours / peer if peer else math.nan


def comparison_rows(summaries: Mapping[str, Mapping[str, Mapping]], ours: str, peer: str) -> list[dict]:
    """Per workload: both servers' TTFT p50 and output tokens/s and ours/peer for each.

    TTFT ratio below 1 and tokens/s ratio above 1 mean ours is ahead.
    """
    rows = []
    for workload, mine in summaries[ours].items():
        theirs = summaries[peer][workload]
        row: dict = {"workload": workload}
        for key, _, _ in RATIO_COLUMNS:
            row[f"ours_{key}"], row[f"peer_{key}"] = mine[key], theirs[key]
            row[f"ratio_{key}"] = ratio(mine[key], theirs[key])
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[Mapping]) -> str:
    header = ["workload"]
    for _, label, _ in RATIO_COLUMNS:
        header += [f"ours {label}", f"peer {label}", f"{label.split(' (')[0]} ours/peer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["workload"]]
        for key, _, digits in RATIO_COLUMNS:
            cells += [f"{row[f'ours_{key}']:.{digits}f}", f"{row[f'peer_{key}']:.{digits}f}",
                      f"{row[f'ratio_{key}']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
