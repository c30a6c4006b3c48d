"""Ours and a peer side by side on the same checkpoint and the same conversations; writes the table and plots.

    python -m perf.run_all               # tiny checkpoint, synthetic data, transformers serve as the peer
    python -m perf.run_all --jsonl internvl_sft.jsonl --image-root /data/InternVL-Chat-V1-2-SFT-Data
    python -m perf.run_all --ours-url http://127.0.0.1:8000/v1 --served-model-name Qwen2-VL-7B-Instruct \
        --peer-url http://127.0.0.1:8100/v1 --peer-model Qwen/Qwen2-VL-7B-Instruct --peer-name vLLM   # GPU host

Unless --ours-url names it already running, starts our stack (tritonserver with the CPU repository
+ proxy, free loopback ports); unless --peer-url names one (vLLM's OpenAI server on a GPU host),
starts `transformers serve` on the same checkpoint (perf/hf_serve_peer.py). Both stay up for the
whole run and take turns: for every repeat and workload each server runs the same conversations,
the order of the two flipping every repeat so background load drifts hit both alike. Each repeat
draws fresh conversations, so caches only help within a conversation, as in real serving. Then
the reference's two-image benchmark runs on both.
Writes OUT/results.json, OUT/table.md, OUT/comparison.png and OUT/reference-<server>.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from export.tiny_model import build_tiny_checkpoint
from perf import openai_bench
from perf.comparison import comparison_rows, markdown_table, pooled_summary
from perf.dataset_bench import HISTORIES, WORKLOADS, TurnResult, assign, run_workload, ttft_by_round
from perf.internvl_data import load_jsonl
from perf.media_server import MediaServer
from perf.peer import TRANSFORMERS_SERVE, TransformersServePeer
from perf.stats import RequestRecord, summarize
from perf.stream_client import Target
from perf.synthetic_data import draw_image, synthesize
from vlmserve.deployment import Stack, prepare_cpu_repository
from vlmserve.processes import free_port
from vlmserve.triton_server import REPO_ROOT, TritonPorts

OURS = "ours"
TABLE_ORDER = ("single-image", "multi-image", "multi-round")
Run = tuple[list[RequestRecord], float]  # one run's records and its wall time
DRAW_ORDER = ("multi-round", "multi-image", "single-image")  # pickiest first: single-image takes any leftover


@dataclass
class Measurements:
    runs: dict[str, dict[str, list[Run]]]  # [server][workload]: one run per repeat
    multi_round_turns: dict[str, list[TurnResult]]  # [server]
    reference: dict[str, Run]  # [server]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


def prepare_data(out: Path, args: argparse.Namespace) -> tuple[Path, Path, str]:
    """The media root served over HTTP, the JSONL of the measured conversations, and where under the root
    its image paths start."""
    root = out / "media"
    if args.jsonl is None:
        synthesize(root / "synthetic", per_shape=args.conversations * args.repeats, seed=args.seed)
        jsonl, prefix = root / "synthetic" / "synthetic.jsonl", "synthetic"
    else:
        link = root / "dataset"
        root.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to((args.image_root or args.jsonl.parent).resolve(), target_is_directory=True)
        jsonl, prefix = args.jsonl, "dataset"
    # Warm-up conversations and the reference benchmark's two images: drawn apart, never measured.
    synthesize(root / "warmup", per_shape=1, seed=args.seed + 1)
    rng = random.Random(args.seed + 2)
    for name in ("a.jpg", "b.jpg"):
        draw_image(rng, root / name, 224, 640)
    return root, jsonl, prefix


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "perf")
    parser.add_argument("--checkpoint", type=Path, help="default: the tiny random-weight checkpoint, built in OUT")
    parser.add_argument("--served-model-name", default="tiny-qwen2-vl")
    parser.add_argument("--jsonl", type=Path, help="InternVL-Chat-V1-2-SFT-Data style JSONL (default: synthetic)")
    parser.add_argument("--image-root", type=Path, help="where the JSONL's image paths start (default: its folder)")
    parser.add_argument("--conversations", type=int, default=16, help="per workload and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4, help="conversations in flight at once")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--history", choices=HISTORIES, default="dataset")
    parser.add_argument("--reference-requests", type=int, default=100)
    parser.add_argument("--reference-workers", type=int, default=10)
    parser.add_argument("--ours-url", help="our stack already running (e.g. docker compose on a GPU host); "
                        "its proxy must be allowed to fetch from 127.0.0.1")
    parser.add_argument("--peer-url", help="an OpenAI server already running on the same checkpoint (e.g. vLLM)")
    parser.add_argument("--peer-model", help="the model name to send to --peer-url")
    parser.add_argument("--peer-name", default="peer", help="how to call --peer-url's server in the output")
    parser.add_argument("--peer-threads", type=int, default=0,
                        help="torch threads of transformers serve (default: 1 for the tiny checkpoint, as ours)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.peer_url and not args.peer_model:
        parser.error("--peer-url needs --peer-model")

    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or out / "tiny-qwen2-vl"
    if args.checkpoint is None and not (checkpoint / "config.json").exists():
        build_tiny_checkpoint(checkpoint)
    media_root, jsonl, prefix = prepare_data(out, args)
    load_before = os.getloadavg()
    results, peer_description = serve_and_measure(args, checkpoint.resolve(), out, media_root, jsonl, prefix)
    report = write_report(args, out, results, peer_description)
    report.update(load_average_before=load_before, load_average_after=os.getloadavg(),
                  elapsed_s=time.perf_counter() - started)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"\npeer: {peer_description}\n")
    print(markdown_table(report["rows"]))
    print("\nreference benchmark (same two images every request):")
    for t, s in report["reference"].items():
        print(f"  {t:>20}: QPS {s['qps']:.2f}, mean latency {s['latency_mean_s']:.3f}s, "
              f"TTFT p50 {s['ttft_p50_s']:.3f}s, {s['output_tokens_per_s']:.1f} output tokens/s")
    print(f"\n{out}/table.md, results.json, comparison.png, reference-*.png ({report['elapsed_s']:.0f}s in all)")


def serve_and_measure(args: argparse.Namespace, checkpoint: Path, out: Path, media_root: Path, jsonl: Path,
                      prefix: str) -> tuple[Measurements, str]:
    """Start the servers not given by URL, run every workload on both, stop them; the figures and what the peer was."""
    draw = [WORKLOADS[w] for w in DRAW_ORDER]
    plan = assign(list(load_jsonl(jsonl)), draw, args.conversations, args.repeats, args.seed)
    warmup = assign(list(load_jsonl(media_root / "warmup" / "synthetic.jsonl")), draw, 1)
    threads = 1 if args.checkpoint is None else 0  # 1 torch thread for the tiny checkpoint, as scripts/serve.sh
    with contextlib.ExitStack() as running:
        our_url = args.ours_url or start_our_stack(running, checkpoint, out / "deploy", args.served_model_name, threads)
        ours = Target(OURS, our_url, args.served_model_name)
        if args.peer_url:
            theirs = Target(args.peer_name, args.peer_url, args.peer_model)
            description = f"{args.peer_name} at {args.peer_url}"
        else:
            peer = TransformersServePeer(checkpoint, free_port(), out / "transformers-serve.log",
                                         args.peer_threads or threads)
            peer.start()
            running.callback(peer.stop)
            theirs, description = peer.target(), TRANSFORMERS_SERVE
        print(f"servers up: {ours.base_url} and {theirs.base_url}", flush=True)
        with MediaServer(media_root) as media:
            return measure(args, [ours, theirs], plan, warmup, media, prefix), description


def start_our_stack(running: contextlib.ExitStack, checkpoint: Path, deploy: Path, model_name: str,
                    llm_threads: int) -> str:
    """tritonserver with the CPU repository plus the proxy, stopped with `running`; the OpenAI base URL."""
    repository = prepare_cpu_repository(checkpoint, deploy, llm_threads=llm_threads)
    # The media server is on loopback, which the proxy refuses to fetch from unless told.
    stack = Stack.create(repository, deploy, model_name, TritonPorts.free(),
                         free_port(), proxy_args=["--allow-media-network", "127.0.0.0/8"])
    stack.start()
    running.callback(stack.stop)
    return stack.proxy.base_url


def write_report(args: argparse.Namespace, out: Path, results: Measurements, peer_description: str) -> dict:
    """table.md and the PNGs; returns what results.json gets."""
    summaries = {t: {w: pooled_summary(runs) for w, runs in per_workload.items()}
                 for t, per_workload in results.runs.items()}
    by_round = {t: ttft_by_round(turns) for t, turns in results.multi_round_turns.items()}
    peer_name = next(t for t in summaries if t != OURS)
    rows = comparison_rows(summaries, OURS, peer_name)
    (out / "table.md").write_text(markdown_table(rows) + "\n")

    from perf.plots import plot_comparison, plot_run  # matplotlib only once the servers are down

    plot_comparison(summaries, by_round, out / "comparison.png")
    for t, (records, _) in results.reference.items():
        plot_run(records, f"{t}: reference benchmark, {args.reference_requests} requests, "
                 f"{args.reference_workers} workers, 2 images each", out / f"reference-{t.replace(' ', '-')}.png")
    return {
        "machine": machine(), "peer": peer_description,
        "data": str(args.jsonl or "synthetic (perf.synthetic_data)"),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows, "summaries": summaries, "multi_round_ttft_p50_by_round_s": by_round,
        "reference": {t: summarize(*run) for t, run in results.reference.items()},
    }


def measure(args: argparse.Namespace, targets: list[Target], plan: dict, warmup: dict, media: MediaServer,
            prefix: str) -> Measurements:
    results = Measurements({t.name: {w: [] for w in TABLE_ORDER} for t in targets}, {t.name: [] for t in targets}, {})
    for t in targets:
        for w in DRAW_ORDER:  # first requests pay for lazy loading: keep them out of the figures
            run_workload(t, warmup[w][0], WORKLOADS[w], lambda p: media.url(f"warmup/{p}"), 1, args.max_tokens)
    for repeat in range(args.repeats):
        order = targets if repeat % 2 == 0 else targets[::-1]
        for w in TABLE_ORDER:
            for t in order:
                turns, wall_s = run_workload(t, plan[w][repeat], WORKLOADS[w], lambda p: media.url(f"{prefix}/{p}"),
                                             args.workers, args.max_tokens, args.history)
                results.runs[t.name][w].append(([turn.record for turn in turns], wall_s))
                if w == "multi-round":
                    results.multi_round_turns[t.name] += turns
                errors = sum(not turn.record.ok for turn in turns)
                print(f"repeat {repeat + 1}/{args.repeats} {w:>12} {t.name:>20}: {len(turns)} requests in "
                      f"{wall_s:.1f}s" + (f", {errors} FAILED" if errors else ""), flush=True)
    images = [media.url("a.jpg"), media.url("b.jpg")]
    for t in targets:
        results.reference[t.name] = openai_bench.run(t, images, args.reference_requests, args.reference_workers,
                                                     args.max_tokens)
    return results


if __name__ == "__main__":
    main()
