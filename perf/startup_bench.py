"""Start-up time and memory of `serve` at real proportions, against the preflight's memory estimate.

    python -m perf.startup_bench --out build/perf/startup [-- SERVE_ARGS...]

Builds the random checkpoint with Qwen2-VL-2B-Instruct's shapes (``export.bench_model --shape 2b``) into
OUT once, starts ``python -m launcher.serve`` on it with SERVE_ARGS (default ``DEFAULT_SERVE_ARGS``), asks
one chat question about two images, then stops it with Ctrl-C. Meanwhile it samples, every
``SAMPLE_S``, the host's MemAvailable and each process's peak RSS (VmHWM) and, once the answer came,
each process's PSS. It writes OUT/startup.md and OUT/startup.json: the phases as `serve` printed them,
the peak RSS by process, and the measured total (MemAvailable before the start minus its lowest value
while serving) next to the preflight's estimate for the same settings.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from export.bench_model import build_bench_checkpoint
from export.repository_options import repository_options
from launcher.lifecycle import descendants, parent_pids
from launcher.preflight import available_memory, memory_estimate
from launcher.serve import build_parser
from perf.process_cpu import role, status_bytes
from perf.synthetic_data import draw_scene

DEFAULT_SERVE_ARGS = ("--max-model-len", "4096", "--kv-cache-bytes", str(2**30), "--max-pixels", "200704")
# Ports apart from serve's defaults, so that a test stack or a served default elsewhere does not collide.
PORTS = {"--port": 18300, "--grpc-port": 18301, "--metrics-port": 18302, "--http-port": 18303}
IMAGE_SIZES = ((448, 448), (640, 480))
QUESTION = "What is different between these two images?"
SAMPLE_S = 0.25
START_TIMEOUT_S = 3600.0


def _pss_kib(pid: int) -> dict[str, int]:
    """Pss, Pss_Anon and Pss_File of `pid` in KiB; empty if it is gone."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return {}
    fields = (line.split() for line in lines)
    return {f[0][:-1]: int(f[1]) for f in fields if f and f[0] in ("Pss:", "Pss_Anon:", "Pss_File:")}


@dataclass
class ProcessPeak:
    role: str
    peak_rss_kib: int = 0
    pss_kib: dict[str, int] = field(default_factory=dict)  # once serving, after the answer


@dataclass
class MemoryWatch:
    """Samples MemAvailable and the peak RSS of every process below ``root`` from a thread."""

    root: int
    baseline: int = field(default_factory=available_memory)
    lowest_starting: int | None = None
    lowest_serving: int | None = None
    serving: bool = False
    processes: dict[int, ProcessPeak] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        available = available_memory()
        if self.serving:
            self.lowest_serving = min(available, self.lowest_serving or available)
        else:
            self.lowest_starting = min(available, self.lowest_starting or available)
        for pid in descendants(self.root, parent_pids()):
            figures = status_bytes(pid, "VmHWM")
            if figures is None:
                continue
            process = self.processes.setdefault(
                pid, ProcessPeak("serve (repository, ViT export)" if pid == self.root else "other"))
            if process.role == "other":  # vLLM's processes start as Python's spawn and name themselves later
                process.role = role(pid) or "other"
            process.peak_rss_kib = max(process.peak_rss_kib, figures[0] // 1024)

    def take_pss(self) -> None:
        for pid, process in self.processes.items():
            process.pss_kib = _pss_kib(pid)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def two_images() -> list[str]:
    """Data URLs of two JPEGs of random scenes, new each run."""
    rng = random.Random()
    urls = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, size in enumerate(IMAGE_SIZES):
            path = Path(tmp) / f"{i}.jpg"
            draw_scene(rng, path, size)
            urls.append("data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode())
    return urls


def ask(base_url: str, model: str, max_tokens: int) -> dict:
    """One two-image chat question, greedy; its answer, usage and latency."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=600)
    content = [{"type": "text", "text": QUESTION}]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in two_images()]
    started = time.monotonic()
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                           max_tokens=max_tokens, temperature=0)
    return {"latency_s": time.monotonic() - started, "answer": reply.choices[0].message.content,
            "usage": reply.usage.model_dump()}


def preflight_estimate(checkpoint: Path, serve_args: list[str]) -> dict[str, int]:
    """The preflight's estimate for these settings, by part, as `serve` computes it."""
    parser, _ = build_parser()
    args = parser.parse_args([*serve_args, "--checkpoint", str(checkpoint)])
    estimate = memory_estimate(repository_options(args, checkpoint, Path(tempfile.gettempdir()) / "unused"))
    return {**estimate.parts(), "total": estimate.total}


def _phase(line: str, phases: list[tuple[float, str]]) -> None:
    if line.startswith("[") and " s] " in line:
        seconds, message = line[1:].split(" s] ", 1)
        phases.append((float(seconds), message))
    elif line.startswith("Started in "):
        phases.append((float(line.split()[2]), "started (endpoints printed)"))


def run(checkpoint: Path, out: Path, serve_args: list[str], max_tokens: int) -> dict:
    argv = [*serve_args, "--checkpoint", str(checkpoint), "--workdir", str(out / "serve")]
    for flag, port in PORTS.items():
        if flag not in serve_args:
            argv += [flag, str(port)]
    estimate = preflight_estimate(checkpoint, argv)
    phases: list[tuple[float, str]] = []
    serve = subprocess.Popen([sys.executable, "-m", "launcher.serve", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1)
    watch = MemoryWatch(serve.pid)
    started = threading.Event()

    def follow() -> None:
        for line in serve.stdout:
            print(line, end="", flush=True)
            _phase(line.strip(), phases)
            if line.startswith("Started in "):
                started.set()
        started.set()  # exited

    threading.Thread(target=follow, daemon=True).start()
    try:
        if not started.wait(START_TIMEOUT_S) or serve.poll() is not None:
            raise SystemExit(f"serve did not start (exit code {serve.poll()})")
        watch.serving = True
        port = argv[argv.index("--port") + 1]
        served_name = argv[argv.index("--served-model-name") + 1] if "--served-model-name" in argv else checkpoint.name
        chat = ask(f"http://127.0.0.1:{port}/v1", served_name, max_tokens)
        time.sleep(2)  # a few more samples of the settled stack
        watch.sample()
        watch.take_pss()
    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(120)
        watch.stop()
    return {
        "checkpoint": str(checkpoint), "serve_args": argv, "phases": phases, "chat": chat,
        "processes": [asdict(p) | {"pid": pid} for pid, p in sorted(watch.processes.items())],
        "memavailable_before": watch.baseline,
        "measured_starting": watch.baseline - (watch.lowest_starting or watch.baseline),
        "measured_serving": watch.baseline - (watch.lowest_serving or watch.baseline),
        "estimate": estimate,
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _pss(processes: list[dict]) -> dict[str, int]:
    """Pss, Pss_Anon and Pss_File of `processes` together, in bytes."""
    return {key: 1024 * sum(p["pss_kib"].get(key, 0) for p in processes) for key in ("Pss", "Pss_Anon", "Pss_File")}


def report(result: dict) -> str:
    estimate, measured = result["estimate"], result["measured_serving"]
    lines = ["## Start-up at real proportions", "", f"`serve {' '.join(result['serve_args'])}`", "",
             "| elapsed | phase |", "|---:|---|"]
    lines += [f"| {seconds:.1f} s | {message} |" for seconds, message in result["phases"]]
    lines += ["", "| process | count | peak RSS (VmHWM), largest | PSS serving (anonymous, file) |",
              "|---|---:|---:|---:|"]
    roles: dict[str, list[dict]] = {}
    for process in result["processes"]:
        roles.setdefault(process["role"], []).append(process)
    for name, processes in roles.items():
        peak = max(p["peak_rss_kib"] for p in processes) * 1024
        pss = _pss(processes)
        serving = f"{_gib(pss['Pss'])} ({_gib(pss['Pss_Anon'])}, {_gib(pss['Pss_File'])})" if pss["Pss"] else "gone"
        lines.append(f"| {name} | {len(processes)} | {_gib(peak)} | {serving} |")
    ratio = estimate["total"] / measured if measured else float("nan")
    pss = _pss(result["processes"])
    lines += ["", f"Measured: MemAvailable {_gib(result['memavailable_before'])} before the start, lowest while "
              f"starting {_gib(result['measured_starting'])} below it, lowest while serving "
              f"{_gib(measured)} below it; PSS of all processes while serving {_gib(pss['Pss'])} (anonymous "
              f"{_gib(pss['Pss_Anon'])}, file-backed {_gib(pss['Pss_File'])}).",
              f"Preflight estimate {_gib(estimate['total'])} ("
              + ", ".join(f"{name} {_gib(size)}" for name, size in estimate.items() if name != "total")
              + f"): {ratio:.2f}x the measured total while serving.",
              f"Two-image chat: {result['chat']['latency_s']:.1f} s, usage {result['chat']['usage']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/perf/startup"))
    parser.add_argument("--checkpoint", type=Path, help="default: build the 2b-shaped one into OUT once")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("serve_args", nargs="*", help="after --: serve's own options")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = args.out / "qwen2-vl-2b-shaped"
        if not (checkpoint / "config.json").exists():
            build_bench_checkpoint(checkpoint, shape="2b")
    result = run(checkpoint.resolve(), args.out.resolve(), args.serve_args or list(DEFAULT_SERVE_ARGS),
                 args.max_tokens)
    (args.out / "startup.json").write_text(json.dumps(result, indent=1))
    (args.out / "startup.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
