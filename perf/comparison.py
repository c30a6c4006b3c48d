"""Ours against a peer: one row per workload and server, with ours/peer ratios and how many answers match."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

# CPU seconds per 1,000 output tokens spent by the server's processes other than vLLM's engine core and worker.
CPU_OUTSIDE_ENGINE = "cpu_outside_engine_s_per_1k_tokens"
# summary key, column label, decimals, factor to the unit of the label
COLUMNS = (("qps", "QPS", 2, 1), ("ttft_p50_s", "TTFT p50 (s)", 3, 1), ("ttft_p99_s", "TTFT p99 (s)", 3, 1),
           ("tpot_p50_s", "TPOT p50 (ms)", 1, 1000), ("output_tokens_per_s", "output tokens/s", 1, 1),
           (CPU_OUTSIDE_ENGINE, "CPU outside engine (s/1k tokens)", 2, 1))


def ratio(ours: float, peer: float) -> float:
    return ours / peer if peer else math.nan


def comparison_rows(results: Mapping[str, Mapping[str, Mapping]], peer: str) -> list[dict]:
    """Per workload and server: the figures, and for our servers ours/peer and the identical answers.

    `results[workload][server]` holds `summary` (perf.stats.summarize) and, for servers other than the
    peer, `identical` and `compared` (perf.sessions.identical_answers). A ratio above 1 is ours ahead
    for QPS and tokens/s, behind for TTFT, TPOT and CPU.
    """
    rows = []
    for workload, servers in results.items():
        theirs = servers[peer]["summary"]
        for server, result in servers.items():
            mine = result["summary"]
            row = {"workload": workload, "server": server, "requests": mine["requests"], "errors": mine["errors"],
                   **{key: mine[key] for key, *_ in COLUMNS}}
            if server != peer:
                row["ratios"] = {key: ratio(mine[key], theirs[key]) for key, *_ in COLUMNS}
                row["identical"], row["compared"] = result["identical"], result["compared"]
            rows.append(row)
    return rows


def _identical(row: Mapping) -> str:
    if "identical" not in row:
        return "-"
    share = f" ({row['identical'] / row['compared']:.0%})" if row["compared"] else ""
    return f"{row['identical']}/{row['compared']}{share}"


def markdown_table(rows: Sequence[Mapping]) -> str:
    """Our rows show ours/peer in brackets after each figure; `identical` counts greedy answers equal to the peer's."""
    header = ["workload", "server", "requests", "errors", *(label for _, label, _, _ in COLUMNS), "identical to peer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["workload"], row["server"], str(row["requests"]), str(row["errors"])]
        for key, _, digits, factor in COLUMNS:
            cell = f"{row[key] * factor:.{digits}f}"
            cells.append(f"{cell} ({row['ratios'][key]:.2f})" if "ratios" in row else cell)
        cells.append(_identical(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
