"""Everything between a checkpoint directory and a running stack: ONNX export, repository, processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from export.generate_repository import RepositoryOptions, generate_repository
from export.vision_onnx import export_vision_onnx
from vlmserve.processes import stop_process, wait_healthy
from vlmserve.triton_server import REPO_ROOT, TritonPorts, TritonServer, triton_environment


def prepare_cpu_repository(checkpoint: Path, workdir: Path, **options) -> Path:
    """Export the vision tower (once per checkpoint) and write the CPU model repository."""
    workdir.mkdir(parents=True, exist_ok=True)
    onnx_path = workdir / "vit.onnx"
    if not onnx_path.exists() or onnx_path.stat().st_mtime < (checkpoint / "config.json").stat().st_mtime:
        export_vision_onnx(checkpoint, onnx_path)
    return generate_repository(RepositoryOptions(checkpoint=checkpoint, out=workdir / "model_repository",
                                                 target="cpu", vit_onnx=onnx_path, **options))


@dataclass
class ProxyProcess:
    """The OpenAI proxy as a child process; `extra_args` go to `python -m openai_proxy` as they are."""

    triton_grpc_url: str
    port: int
    model_name: str
    log_path: Path | None = None
    extra_args: Sequence[str] = ()
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 60.0) -> None:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "openai_proxy", "--triton-url", self.triton_grpc_url, "--host", "127.0.0.1",
             "--port", str(self.port), "--served-model-name", self.model_name, *self.extra_args],
            cwd=REPO_ROOT, env=triton_environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(self.process, f"http://127.0.0.1:{self.port}/health", timeout_s, "proxy", self.log_path)

    def stop(self, timeout_s: float = 40.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s` (the proxy lets requests in flight finish first)."""
        stop_process(self.process, timeout_s)


@dataclass
class Stack:
    """tritonserver with our repository plus the proxy in front of it."""

    triton: TritonServer
    proxy: ProxyProcess

    @classmethod
    def create(cls, repository: Path, workdir: Path, model_name: str, ports: TritonPorts, proxy_port: int,
               proxy_args: Sequence[str] = ()) -> "Stack":
        triton = TritonServer(repository, workdir / "tritonserver", ports, log_path=workdir / "tritonserver.log")
        proxy = ProxyProcess(triton.grpc_url, proxy_port, model_name, log_path=workdir / "proxy.log",
                             extra_args=proxy_args)
        return cls(triton, proxy)

    def start(self) -> None:
        self.triton.start()
        try:
            self.proxy.start()
        except Exception:
            self.triton.stop()
            raise

    def running(self) -> bool:
        return all(p is not None and p.poll() is None for p in (self.triton.process, self.proxy.process))

    def stop(self) -> None:
        self.proxy.stop()
        self.triton.stop()
