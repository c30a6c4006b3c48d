"""The peer that perf.run_all measures next to ours when none is given by URL: `transformers serve`, started here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from perf.stream_client import Target
from vlmserve.processes import stop_process, wait_healthy
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
        try:
            wait_healthy(self.process, f"http://127.0.0.1:{self.port}/health", timeout_s, "transformers serve",
                         self.log_path)
        except Exception:
            self.stop()
            raise

    def stop(self, timeout_s: float = 20.0) -> None:
        stop_process(self.process, timeout_s)
