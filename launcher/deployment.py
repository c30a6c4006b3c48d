"""Everything between a checkpoint directory and a running stack: ONNX export, repository, processes."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from export.generate_repository import RepositoryOptions, generate_repository, hosted_models
from export.vision_onnx import export_vision_onnx
from launcher.lifecycle import Deployment
from launcher.progress import Report, silent
from launcher.processes import OWN_GROUP, TRITON_STOP_S, listening_socket, open_log, stop_process, wait_healthy
from launcher.supervisor import Supervisor
from vlmserve.contracts import VIT
from launcher.triton_server import (LOAD_TIMEOUT_S, REPO_ROOT, ServerExited, TritonPorts, TritonServer,
                                   triton_environment)

logger = logging.getLogger(__name__)


def cpu_repository_options(checkpoint: Path, workdir: Path, **options) -> RepositoryOptions:
    """The options of the CPU repository in ``workdir`` (its ViT exported to workdir/vit.onnx)."""
    return RepositoryOptions(checkpoint=checkpoint, out=workdir / "model_repository", target="cpu",
                             vit_onnx=workdir / "vit.onnx", **options)


def write_cpu_repository(opts: RepositoryOptions, report: Report = silent) -> Path:
    """Export the vision tower to `opts.vit_onnx` (once per checkpoint, where this host runs it) and write the CPU
    model repository."""
    onnx_path = opts.vit_onnx
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    stale = not onnx_path.exists() or onnx_path.stat().st_mtime < (opts.checkpoint / "config.json").stat().st_mtime
    if VIT.NAME in hosted_models(opts) and stale:
        report(f"exporting the vision tower to {onnx_path}")
        export_vision_onnx(opts.checkpoint, onnx_path, report=report)
        report("vision tower exported and checked")
    repository = generate_repository(opts)
    report(f"model repository written: {repository}")
    return repository


def prepare_cpu_repository(checkpoint: Path, workdir: Path, **options) -> Path:
    """Export the vision tower (once per checkpoint) and write the CPU model repository."""
    return write_cpu_repository(cpu_repository_options(checkpoint, workdir, **options))


@dataclass
class ProxyProcess:
    """The OpenAI proxy as a child process; `extra_args` go to `python -m openai_proxy` as they are."""

    triton_grpc_url: str
    port: int
    log_path: Path | None = None
    extra_args: Sequence[str] = ()
    deployment: Deployment | None = None
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the proxy on `port` (0: any free port, then `port` says which)."""
        env = triton_environment()
        with open_log(self.log_path) as log, listening_socket(self.port) as sock:
            self.port = sock.getsockname()[1]
            self.process = subprocess.Popen(
                [sys.executable, "-m", "openai_proxy", "--triton-url", self.triton_grpc_url,
                 "--fd", str(sock.fileno()), *self.extra_args],
                cwd=REPO_ROOT, env=self.deployment.environment(env) if self.deployment else env, stdout=log,
                stderr=subprocess.STDOUT, process_group=OWN_GROUP, pass_fds=(sock.fileno(),))
        wait_healthy(self.process, f"http://127.0.0.1:{self.port}/health", timeout_s, "proxy", self.log_path)

    def lose_requests_in_flight(self) -> None:
        """Tell the proxy that Triton will never answer its requests in flight: it ends them with a 503."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGUSR1)

    def stop(self, timeout_s: float = 40.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s` (the proxy lets requests in flight finish first)."""
        stop_process(self.process, timeout_s)


START_ATTEMPTS = 3


@dataclass
class Stack:
    """tritonserver with our repository plus the proxy in front of it (none on a ViT server), one deployment
    (see `lifecycle`).

    While it runs, a supervisor brings back any model process that dies, or the server. A start first
    removes whatever an earlier run in the same work directory left; a stop leaves no process and no
    shm region of the deployment behind.
    """

    triton: TritonServer
    proxy: ProxyProcess | None
    deployment: Deployment
    proxy_stop_s: float = 40.0  # the proxy's grace period plus a margin; then it is killed
    supervisor: Supervisor | None = None

    @classmethod
    def create(cls, repository: Path, workdir: Path, ports: TritonPorts, proxy_port: int | None,
               proxy_args: Sequence[str] = (), proxy_stop_s: float = 40.0,
               load_timeout_s: float = LOAD_TIMEOUT_S, triton_address: str = "127.0.0.1") -> Stack:
        """``proxy_port`` None: no proxy (a ViT server's stack)."""
        deployment = Deployment.of(workdir)
        triton = TritonServer(repository, workdir / "tritonserver", ports, log_path=workdir / "tritonserver.log",
                              deployment=deployment, load_timeout_s=load_timeout_s, address=triton_address)
        proxy = None if proxy_port is None else ProxyProcess(
            triton.grpc_url, proxy_port, log_path=workdir / "proxy.log", extra_args=proxy_args, deployment=deployment)
        return cls(triton, proxy, deployment, proxy_stop_s)

    def start(self, report: Report = silent) -> None:
        """Start tritonserver, then the proxy; ``report`` hears of each phase."""
        self.deployment.remove_all()
        try:
            report("starting tritonserver: loading the models")
            self._start_triton(report)
            if self.proxy is not None:
                self.proxy.start()
                report("proxy up")
        except BaseException:  # a Ctrl-C during the start too
            self.stop()
            raise
        proxy = self.proxy
        self.supervisor = Supervisor(
            self.triton, keep=lambda: [] if proxy is None else [proxy.process.pid],
            on_requests_lost=(lambda: None) if proxy is None else proxy.lose_requests_in_flight)
        self.supervisor.start()

    def _start_triton(self, report: Report) -> None:
        # Seen under heavy load: tritonserver aborts (boost lock_exception) while several stubs initialize
        # at once. The supervisor restarts a running server that dies; a start gets the same second chance,
        # unless a model failed to load (it would again).
        for attempt in range(START_ATTEMPTS):
            try:
                self.triton.start(report=report)
                return
            except ServerExited as exited:
                if exited.failure is not None or attempt == START_ATTEMPTS - 1:
                    raise
                logger.exception("tritonserver died while starting; starting it again")
                self.triton.kill()

    def running(self) -> bool:
        """The proxy (if any) and the supervisor run (the supervisor brings tritonserver back if it dies)."""
        proxy_runs = self.proxy is None or (self.proxy.process is not None and self.proxy.process.poll() is None)
        return proxy_runs and self.supervisor is not None and self.supervisor.running()

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.proxy is not None:
            self.proxy.stop(self.proxy_stop_s)
        self.triton.stop(TRITON_STOP_S)
        if self.supervisor is not None:
            self.supervisor.join(TRITON_STOP_S)
        self.deployment.remove_all()  # what left the server's process group (a setsid) and the proxy's children
