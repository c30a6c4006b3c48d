"""The peer that perf.run_all measures next to ours when none is given by URL: `transformers serve`, started here."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from perf.stream_client import Target
from vlmserve.triton_server import REPO_ROOT

TRANSFORMERS_SERVE = (
    "transformers serve (perf/hf_serve_peer.py: its own model loading, chat template and generation, "
    "with an image-only Qwen2-VL processor since torchvision cannot load here); it serves a VLM "
    "one request at a time: --continuous-batching is passed, and it falls back to sequential "
    "generate() for image-text models"
)


class TransformersServePeer:
    """`python -m perf.hf_serve_peer CHECKPOINT` as a child process on 127.0.0.1:`port`."""

    def __init__(self, checkpoint: Path, port: int, log_path: Path, torch_threads: int = 0) -> None:
        self.checkpoint = checkpoint
        self.port = port
        self.log_path = log_path
        self.torch_threads = torch_threads
        self.process: subprocess.Popen | None = None

    def target(self) -> Target:
        # It serves the one checkpoint it was started with, under its path as the model id.
        return Target("transformers serve", f"http://127.0.0.1:{self.port}/v1", str(self.checkpoint),
                      stream_options=False)

    def start(self, timeout_s: float = 180.0) -> None:
        env = dict(os.environ)
        if self.torch_threads:
            env["OMP_NUM_THREADS"] = str(self.torch_threads)
        command = [sys.executable, "-m", "perf.hf_serve_peer", str(self.checkpoint), "--host", "127.0.0.1",
                   "--port", str(self.port), "--device", "cpu", "--continuous-batching", "--log-level", "info"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited ({self.process.returncode}); see {self.log_path}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"transformers serve not healthy after {timeout_s:.0f}s; see {self.log_path}")

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
