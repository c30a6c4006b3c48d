"""Start a real `tritonserver` without Docker, from the binary in the `nvidia-pytriton` wheel.

The wheel ships Triton with the Python backend but keeps the backend stub for each Python version
apart; we copy the server once into a writable directory, put the stub for the running
interpreter next to the backend, and run the binary with the wheel's bundled libraries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import tritonclient.grpc as grpcclient

from launcher.lifecycle import Deployment, parent_pids
from launcher.processes import OWN_GROUP, free_ports, open_log
from launcher.progress import Report, silent
from launcher.startup_log import LoadFailure, StartupLog

REPO_ROOT = Path(__file__).resolve().parent.parent


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def prepare_triton_install(dest: Path) -> Path:
    """Copy the wheel's tritonserver into `dest` (once) with the matching Python stub; return the copy."""
    marker = dest / ".prepared"
    if marker.exists():
        return dest
    source = _site_packages() / "pytriton" / "tritonserver"
    if not source.is_dir():
        raise RuntimeError("nvidia-pytriton is not installed: no tritonserver binary in site-packages")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, symlinks=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dest / "python_backend_stubs" / version / "triton_python_backend_stub"
    shutil.copy2(stub, dest / "backends" / "python" / "triton_python_backend_stub")
    marker.touch()
    return dest


def triton_environment() -> dict[str, str]:
    """Environment for tritonserver: bundled libs, the venv's packages and our shared package."""
    env = dict(os.environ)
    libs = _site_packages() / "nvidia_pytriton.libs"
    # The stub links libpython3.X.so: make it the running interpreter's, not another install's,
    # or stdlib extension modules fail with undefined symbols.
    libpython_dir = sysconfig.get_config_var("LIBDIR")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libpython_dir, str(libs), env.get("LD_LIBRARY_PATH")]))
    # The backend stub embeds the system libpython; it finds the venv's packages and ours this way.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), str(_site_packages()), env.get("PYTHONPATH")]))
    env["VIRTUAL_ENV"] = sys.prefix
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@dataclass
class TritonPorts:
    http: int = 8010
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> TritonPorts:
        """Three ports nothing listens on (tests and benchmarks run beside other servers)."""
        return cls(*free_ports(3))


class ServerExited(RuntimeError):
    """tritonserver exited while it was starting; `failure`: a model that failed to load, and why."""

    def __init__(self, message: str, failure: LoadFailure | None = None) -> None:
        super().__init__(message)
        self.failure = failure


@dataclass(frozen=True)
class StubInstance:
    """One Python-backend stub process: the model instance it runs and its shared-memory region."""

    model: str
    pid: int
    region: str


# How long tritonserver may wait for requests in flight on SIGTERM: the proxy in front has drained them by then.
EXIT_TIMEOUT_S = 2
# How long a start may take to load every model, or a reload one model, unless told (serve: --load-timeout-s).
LOAD_TIMEOUT_S = 300.0
STUB_NAME = "triton_python_backend_stub"


class TritonServer:
    """A tritonserver child process bound to `address` (127.0.0.1 unless a ViT server must be reached from other
    hosts), the leader of a process group of its own.

    Models are loaded explicitly (all of them at start), so that one whose backend process died can be
    unloaded and loaded again through the repository API while the others keep serving.
    """

    def __init__(self, model_repository: Path, install_dir: Path, ports: TritonPorts, log_path: Path | None = None,
                 extra_args: list[str] | None = None, deployment: Deployment | None = None,
                 load_timeout_s: float = LOAD_TIMEOUT_S, address: str = "127.0.0.1") -> None:
        self.model_repository = model_repository
        self.address = address
        self.load_timeout_s = load_timeout_s  # a start (every model) or one model's reload
        self.install_dir = prepare_triton_install(install_dir)
        self.ports = ports
        self.log_path = log_path
        self.extra_args = extra_args or []
        self.deployment = deployment or Deployment.of(install_dir)
        self.process: subprocess.Popen | None = None
        # A supervisor may start the server again from its thread; once stopped, it must stay stopped.
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def _host(self) -> str:
        """Where this host's own clients reach the server."""
        return "127.0.0.1" if self.address in ("0.0.0.0", "::") else self.address

    @property
    def grpc_url(self) -> str:
        return f"{self._host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._host}:{self.ports.metrics}/metrics"

    def command(self) -> list[str]:
        return [
            str(self.install_dir / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.install_dir / 'backends'}",
            f"--http-address={self.address}", f"--http-port={self.ports.http}",
            f"--grpc-address={self.address}", f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.address}", f"--metrics-port={self.ports.metrics}",
            "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
            "--exit-on-error=true", f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            "--model-control-mode=explicit", "--load-model=*",
            # Our configs are complete; auto-completion would start each Python model's stub once more just to
            # ask it (for `vlm`, a whole import of vLLM: ~7 s of every load and reload).
            "--disable-auto-complete-config",
            # Our own region names, so that a stop (or the next start) finds and removes exactly ours.
            f"--backend-config=python,shm-region-prefix-name={self.deployment.shm_prefix}",
            *self.extra_args,
        ]

    def start(self, report: Report = silent) -> None:
        """Start the server and return once every model is ready; ``report`` hears of each phase (from the log)."""
        with self._lock, open_log(self.log_path) as log:
            if self._stopped:
                raise RuntimeError("tritonserver was stopped")
            startup_log = StartupLog(self.log_path)
            # A process group of its own (what `kill` finds), in our session: see launcher.processes.OWN_GROUP.
            self.process = subprocess.Popen(self.command(), env=self.deployment.environment(triton_environment()),
                                            stdout=log, stderr=subprocess.STDOUT, process_group=OWN_GROUP)
        self.wait_ready(self.load_timeout_s, startup_log, report)

    def wait_ready(self, timeout_s: float, startup_log: StartupLog, report: Report = silent) -> None:
        client = grpcclient.InferenceServerClient(self.grpc_url)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                for phase in startup_log.new_phases():
                    report(phase)
                if self.process is not None and self.process.poll() is not None:
                    failure = startup_log.failure()
                    raise ServerExited(f"tritonserver exited with code {self.process.returncode}"
                                       + (f": model {failure.model}: {failure.reason}" if failure else "")
                                       + f"; see {self.log_path}", failure)
                try:
                    if client.is_server_ready():
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.5)
        finally:
            client.close()
        raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f}s; see {self.log_path}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM; after `timeout_s` kill what is left of the server's process group, then its shm regions."""
        with self._lock:
            self._stopped = True
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            self.kill()

    def kill(self) -> None:
        """SIGKILL the server and every process of its group (stubs, and what they started: vLLM's engine
        core and workers keep the group), orphans included, then remove the server's shm regions."""
        if self.process is None:
            return
        group = self.process.pid  # the group lives on, with this id, while any member does
        self.deployment.kill(pid for pid in parent_pids() if _process_group(pid) == group)
        self.process.wait()
        for region in self.deployment.regions():
            region.unlink(missing_ok=True)

    def stub_instances(self) -> dict[str, StubInstance]:
        """Live Python-backend stubs of this server, by instance name ("vit_0_0")."""
        if self.process is None:
            return {}
        instances = {}
        for pid, ppid in parent_pids().items():
            if ppid != self.process.pid:
                continue
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            # argv: stub, <repository>/<model>/<version>/model.py, region, shm sizes, parent pid, ..., instance name
            if argv[0].endswith(STUB_NAME) and len(argv) > 8:
                instances[argv[8]] = StubInstance(Path(argv[1]).parent.parent.name, pid, argv[2])
        return instances

    def is_decoupled(self, name: str) -> bool:
        """Whether the server runs `name` with a decoupled transaction policy (its own view of the config)."""
        response = httpx.get(f"http://{self._host}:{self.ports.http}/v2/models/{name}/config", timeout=10)
        response.raise_for_status()
        return bool(response.json().get("model_transaction_policy", {}).get("decoupled"))

    def reload_model(self, name: str) -> None:
        """Unload `name` (the server reports not-ready meanwhile) and load it again, with new processes."""
        base = f"http://{self._host}:{self.ports.http}/v2/repository/models/{name}"
        for action in ("unload", "load"):
            response = httpx.post(f"{base}/{action}", json={}, timeout=self.load_timeout_s)
            if response.status_code != 200:
                raise RuntimeError(f"{action} {name}: HTTP {response.status_code} {response.text}")


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
