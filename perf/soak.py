"""Soak: mixed traffic through the proxy for N minutes, then an RSS table of every process of the stack.

    python -m perf.soak                        # 30 minutes on the small checkpoint, vLLM engine

Traffic, from `--workers` clients one request at a time each: text chats, chats with a new image (a ViT
cache miss), chats with one of a few images seen before (hits), streamed chats and text completions.
Every process the deployment runs (tritonserver, each backend stub, vLLM's engine core and workers, the
proxy) and its shm regions are sampled every `--sample-s` seconds: each process's RSS less the shared
memory it maps, and the pages the Python backend's regions hold, counted once. Before the traffic, every
client sends a few of the largest new images at once: the regions grow to what the largest concurrent
tensors need and never shrink, so they reach that size before the warm-up ends, not at some random later
time. After the warm-up (a fifth of the run) each process must stay within `--max-growth` of its RSS at
the end of the warm-up (the `vit_cache` process may add its cache budget, which it may still be filling),
and the ViT cache within its budget; the exit code is 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import random
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from perf.process_cpu import status_bytes
from perf.vit_stack import checkpoint_or_tiny, noise_png, running_stack
from launcher.lifecycle import Deployment
from launcher.triton_server import REPO_ROOT, STUB_NAME

VIT_CACHE_MB = 64  # small, so that a run of minutes fills it and eviction is exercised
WIDTHS, HEIGHTS = (224, 448, 640), (224, 336)  # of the new images
PEAK_ROUNDS = 10  # largest images per client before the traffic starts


def process_name(pid: int) -> str | None:
    """A name that stays the same across samples: the stub's instance, else the program."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None
    if argv[0].endswith(STUB_NAME) and len(argv) > 8:
        return argv[8]
    if "-m" in argv:
        return argv[argv.index("-m") + 1]
    return Path(argv[0]).name


def private_rss_bytes(pid: int) -> int:
    """RSS less the shared-memory pages the process maps: tritonserver maps every stub's shm region, and each
    stub its own, so their pages would count several times over; they are counted once, as the regions'."""
    figures = status_bytes(pid, "VmRSS", "RssShmem")
    if figures is None:
        return 0
    rss, shmem = figures
    return rss - shmem


@dataclass
class Samples:
    """RSS less shared memory per process name over time, plus the pages of the deployment's shm regions and
    the ViT cache's bytes."""

    rss: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # without shared memory
    shm: list[tuple[float, int]] = field(default_factory=list)
    vit_cache: list[tuple[float, int]] = field(default_factory=list)

    def take(self, elapsed: float, deployment: Deployment, metrics_url: str) -> None:
        for pid in deployment.pids():
            name = process_name(pid)
            if name is not None:
                self.rss.setdefault(f"{name} ({pid})", []).append((elapsed, private_rss_bytes(pid)))
        # The pages the regions hold (tmpfs allocates on first touch), not their sizes.
        self.shm.append((elapsed, sum(region.stat().st_blocks * 512 for region in deployment.regions())))
        try:
            metrics = httpx.get(metrics_url, timeout=30).text
        except httpx.HTTPError:  # a server this busy answers late; the next sample will tell
            return
        match = re.search(r"^vlm_vit_cache_bytes(?:{[^}]*})? ([0-9.e+]+)$", metrics, re.MULTILINE)
        self.vit_cache.append((elapsed, int(float(match.group(1))) if match else 0))


def _at(series: list[tuple[float, int]], when: float) -> int:
    """The last sample at or before `when` (the first one if none is)."""
    before = [value for t, value in series if t <= when]
    return before[-1] if before else series[0][1]


def report(samples: Samples, warmup_s: float, max_growth: float, cache_budget: int) -> bool:
    """Print the table; True when every process stayed within `max_growth` after the warm-up."""
    ok = True
    print(f"\n{'RSS without shm':<42} {'after warm-up':>14} {'end':>10} {'max':>10} {'growth':>8}")
    rows = [(name, series) for name, series in sorted(samples.rss.items())]
    rows.append(("shm regions (all, resident)", samples.shm))
    for name, series in rows:
        start, end = _at(series, warmup_s), series[-1][1]
        peak = max((value for t, value in series if t >= warmup_s), default=end)
        growth = (peak - start) / start if start else 0.0
        # The cache process may still be filling its budget after the warm-up: that much is allowed on top.
        allowed = start * max_growth + (cache_budget if name.startswith("vit_cache") else 0)
        flag = "" if peak - start <= allowed else "  > limit"
        ok &= not flag
        print(f"{name:<42} {start / 2**20:>12.1f}MB {end / 2**20:>8.1f}MB {peak / 2**20:>8.1f}MB {growth:>7.1%}{flag}")
    cache_peak = max((value for _, value in samples.vit_cache), default=0)
    print(f"ViT cache peak {cache_peak / 2**20:.1f} MB of a {cache_budget / 2**20:.0f} MB budget")
    return ok and cache_peak <= cache_budget


class Traffic:
    """Clients sending a mix of requests, one at a time each, until stopped; counts statuses."""

    def __init__(self, base_url: str, model: str, workers: int, seed: int) -> None:
        self.base_url, self.model = base_url, model
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._new_images = itertools.count(seed * 1_000_000)
        seen = [noise_png(320, 240, seed + i) for i in range(4)]
        self._seen = ["data:image/png;base64," + base64.b64encode(png).decode() for png in seen]
        self._threads = [threading.Thread(target=self._run, args=(random.Random(seed + i),), daemon=True)
                         for i in range(workers)]

    def _image_url(self, new: bool, rng: random.Random, largest: bool = False) -> str:
        if not new:
            return rng.choice(self._seen)
        width, height = (max(WIDTHS), max(HEIGHTS)) if largest else (rng.choice(WIDTHS), rng.choice(HEIGHTS))
        png = noise_png(width, height, next(self._new_images))
        return "data:image/png;base64," + base64.b64encode(png).decode()

    def peak(self, rounds: int) -> None:
        """Every client at once sends `rounds` chats with a new image of the largest size, before the traffic
        starts: the Python backend's shm regions grow to what the largest concurrent tensors need (and never
        shrink), which random traffic would reach at some random time."""
        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(timeout=120) as http:
                for _ in range(rounds):
                    self._count(lambda: self._request(http, rng, "new image", largest=True))

        threads = [threading.Thread(target=client, args=(-1 - i,)) for i in range(len(self._threads))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _request(self, client: httpx.Client, rng: random.Random, kind: str | None = None,
                 largest: bool = False) -> int:
        kind = kind or rng.choice(("text", "new image", "seen image", "stream", "completion"))
        if kind == "completion":
            body = {"model": self.model, "prompt": "Once upon a time", "max_tokens": 16}
            return client.post(f"{self.base_url}/completions", json=body).status_code
        content: list[dict] = [{"type": "text", "text": "What is in it?"}]
        if kind in ("new image", "seen image"):
            url = self._image_url(kind == "new image", rng, largest)
            content.append({"type": "image_url", "image_url": {"url": url}})
        body = {"model": self.model, "max_tokens": 24, "messages": [{"role": "user", "content": content}],
                "stream": kind == "stream"}
        with client.stream("POST", f"{self.base_url}/chat/completions", json=body) as response:
            response.read()
            return response.status_code

    def _run(self, rng: random.Random) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                self._count(lambda: self._request(client, rng))

    def _count(self, request: Callable[[], int]) -> None:
        try:
            status = request()
        except httpx.HTTPError:
            status = 0
        with self._lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(150)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--checkpoint", type=Path, help="default: the small test checkpoint")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "build" / "soak")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--max-growth", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    checkpoint = checkpoint_or_tiny(args.checkpoint, args.workdir)
    duration_s, warmup_s = args.minutes * 60, args.minutes * 60 / 5
    samples = Samples()
    with running_stack(checkpoint, args.workdir / "deploy", vit_cache_mb=VIT_CACHE_MB, enforce_eager=True,
                       kv_cache_bytes=256 * 2**20) as stack:
        traffic = Traffic(stack.proxy.base_url, checkpoint.name, args.workers, args.seed)
        traffic.peak(PEAK_ROUNDS)
        started = time.monotonic()
        with traffic:
            while (elapsed := time.monotonic() - started) < duration_s:
                samples.take(elapsed, stack.deployment, stack.triton.metrics_url)
                time.sleep(args.sample_s)
            samples.take(time.monotonic() - started, stack.deployment, stack.triton.metrics_url)
        restarts = stack.supervisor.restarts
    print(f"{args.minutes:g} minutes ({warmup_s / 60:g} of warm-up), "
          f"requests by status {dict(sorted(traffic.statuses.items()))}, supervisor restarts {restarts}")
    ok = report(samples, warmup_s, args.max_growth, VIT_CACHE_MB * 2**20)
    sys.exit(0 if ok and restarts == 0 else 1)


if __name__ == "__main__":
    main()
