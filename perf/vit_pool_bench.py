"""What sending the ViT work to ViT servers over gRPC costs: the two-images and 1080p workloads on a stack with the
ViT on the LLM host, then on an LLM host whose media go to ViT-role tritonservers on the same machine.

    python -m perf.vit_pool_bench                            # the bench checkpoint, one ViT server
    python -m perf.vit_pool_bench --vit-servers 2            # on a larger host: what a second server adds
    python -m perf.vit_pool_bench --checkpoint /models/Qwen2-VL-7B-Instruct --vit-servers 1 2 4

Each layout starts alone (the one before it stopped), on new media drawn for the run (perf.workloads) and
warmed up with an image and a video. Reported per workload: QPS and its ratio to the local layout, the share
of greedy answers identical to the local layout's, and from the LLM host's metrics what crossed the network
per image: bytes sent (the image as fetched, and its options) and received (grid and embeddings).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from export.bench_model import build_bench_checkpoint
from export.repository_options import VIT_SERVER
from launcher.deployment import Stack, prepare_cpu_repository
from launcher.triton_server import TritonPorts
from perf.media_server import MediaServer
from perf.sessions import TurnResult, identical_answers, run_sessions
from perf.stream_client import Target
from perf.workloads import Sizes, Workload, draw_warmup, draw_workloads

WORKLOADS = ("two-images", "1080p")
LOCAL = "local ViT"


@contextlib.contextmanager
def layout(checkpoint: Path, workdir: Path, vit_servers: int, model_name: str, kv_cache_gib: float
           ) -> Iterator[tuple[Target, Stack]]:
    """The stack clients talk to (an LLM host), with `vit_servers` ViT servers of its own (0: the ViT local)."""
    engine = {"served_model_name": model_name, "kv_cache_bytes": int(kv_cache_gib * 2**30)}
    with contextlib.ExitStack() as running:
        endpoints = []
        for i in range(vit_servers):
            place = workdir / f"vit-{i}"
            server = Stack.create(prepare_cpu_repository(checkpoint, place, role=VIT_SERVER), place,
                                  TritonPorts.free(), None)
            server.start()
            running.callback(server.stop)
            endpoints.append(server.triton.grpc_url)
        host = workdir / "llm-host"
        repository = prepare_cpu_repository(checkpoint, host, vit_endpoints=",".join(endpoints), **engine)
        stack = Stack.create(repository, host, TritonPorts.free(), 0,
                             proxy_args=["--allow-media-network", "127.0.0.0/8"])
        stack.start()
        running.callback(stack.stop)
        name = f"{vit_servers} ViT server(s)" if vit_servers else LOCAL
        yield Target(name, stack.proxy.base_url, model_name), stack


def pool_figures(stack: Stack) -> dict[str, float]:
    """The LLM host's pool counters, summed over its endpoints."""
    body = httpx.get(stack.triton.metrics_url, timeout=10).text
    totals: dict[str, float] = {}
    for name, value in re.findall(r"^vlm_vit_endpoint_(\w+)_total\{[^}]*\} ([0-9.e+]+)$", body, re.MULTILINE):
        totals[name] = totals.get(name, 0.0) + float(value)
    return totals


def measure(target: Target, stack: Stack, workloads: list[Workload], warmup, max_tokens: int
            ) -> dict[str, tuple[list[TurnResult], float, dict[str, float]]]:
    run_sessions(target, warmup, 1, max_tokens)
    results = {}
    for workload in workloads:
        before = pool_figures(stack)
        turns, wall_s = run_sessions(target, workload.sessions, workload.workers, max_tokens)
        time.sleep(1)  # the pool's metrics go out every half second
        after = pool_figures(stack)
        results[workload.name] = turns, wall_s, {k: after[k] - before.get(k, 0.0) for k in after}
        failed = sum(not t.record.ok for t in turns)
        print(f"{workload.name:>12} {target.name:>16}: {len(turns)} requests in {wall_s:.1f} s"
              + (f", {failed} FAILED" if failed else ""), flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="default: the bench checkpoint (built in --out once)")
    parser.add_argument("--vit-servers", type=int, nargs="+", default=[1], help="layouts with this many ViT servers")
    parser.add_argument("--out", type=Path, default=Path("build/perf/vit_pool"))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--two-image-requests", type=int, default=Sizes.two_image_requests)
    parser.add_argument("--hd-requests", type=int, default=Sizes.hd_requests)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    checkpoint = (args.checkpoint or out / "bench-qwen2-vl").resolve()
    if args.checkpoint is None and not (checkpoint / "config.json").exists():
        build_bench_checkpoint(checkpoint)
    seed = time.time_ns() % 2**31 if args.seed is None else args.seed
    media_root = out / "media"
    shutil.rmtree(media_root, ignore_errors=True)  # media of earlier runs: never served again
    media_root.mkdir(parents=True)
    sizes = Sizes(two_image_requests=args.two_image_requests, hd_requests=args.hd_requests)
    results = {}
    with MediaServer(media_root) as media:
        workloads = [w for w in draw_workloads(media_root, media.url, seed, sizes) if w.name in WORKLOADS]
        warmup = draw_warmup(media_root, media.url, seed)
        for servers in [0, *args.vit_servers]:
            with layout(checkpoint, out / f"layout-{servers}", servers, checkpoint.name, args.kv_cache_gib) as (
                    target, stack):
                results[target.name] = measure(target, stack, workloads, warmup, args.max_tokens)
    report(out, results, seed)


def report(out: Path, results: dict, seed: int) -> None:
    local = results[LOCAL]
    rows = ["| workload | layout | QPS | vs local | identical to local | sent per image | received per image |",
            "|---|---|---|---|---|---|---|"]
    summary = []
    for name, by_layout in ((w, {layout: r[w] for layout, r in results.items()}) for w in WORKLOADS):
        local_turns, local_wall, _ = local[name]
        local_qps = sum(t.record.ok for t in local_turns) / local_wall
        for layout_name, (turns, wall_s, pool) in by_layout.items():
            qps = sum(t.record.ok for t in turns) / wall_s
            same, compared = identical_answers(turns, local_turns)
            calls = pool.get("calls", 0)
            sent = pool.get("sent_bytes", 0) / calls if calls else 0
            received = pool.get("received_bytes", 0) / calls if calls else 0
            summary.append({"workload": name, "layout": layout_name, "qps": qps, "ratio": qps / local_qps,
                            "identical": same, "compared": compared, "calls": calls,
                            "sent_bytes_per_image": sent, "received_bytes_per_image": received})
            rows.append(f"| {name} | {layout_name} | {qps:.3f} | {qps / local_qps:.2f}x | {same}/{compared} | "
                        + (f"{sent / 1e3:.0f} kB | {received / 1e6:.2f} MB |" if calls else "- | - |"))
    (out / "table.md").write_text("\n".join(rows) + f"\n\nseed {seed}\n")
    (out / "results.json").write_text(json.dumps({"seed": seed, "rows": summary}, indent=2))
    print("\n" + (out / "table.md").read_text())


if __name__ == "__main__":
    main()
