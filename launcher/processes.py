"""Child server processes: pick free loopback ports, wait until they answer a health URL, stop them politely."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx

# `process_group=` for the servers we start: a process group of their own (stopped as one), kept in our
# session. With a session of its own (setsid), Linux's autogroup would schedule each server as a group
# against the others; on a 2-core host running vLLM's engine, processes of the other sessions then waited
# up to 16 s at a time for a core (a 10 ms sleep loop measured it, with vLLM's own server as with ours),
# which stalls streams and delays cancellations by thousands of engine steps.
OWN_GROUP = 0
# Time tritonserver gets to exit on SIGTERM in `Stack.stop`, once the proxy has drained: then it is killed.
TRITON_STOP_S = 3.0


def free_ports(count: int) -> list[int]:
    """`count` different TCP ports on 127.0.0.1 that nothing listens on right now (all are held until all
    are picked: one at a time, the kernel may hand out the same port twice)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def listening_socket(port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:`port` (0: any free port), to hand to a child server: it accepts
    from the moment it exists, so nothing else can take the port while the child starts."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def open_log(path: Path | None) -> Iterator[IO[bytes] | int]:
    """Where a child's output goes: appended to `path`, or nowhere. The child keeps its own copy of the file."""
    if path is None:
        yield subprocess.DEVNULL
        return
    with open(path, "ab") as log:
        yield log


def wait_healthy(process: subprocess.Popen, url: str, timeout_s: float, name: str, log_path: Path | None) -> None:
    """Return once `url` answers 200; raise if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode}; see {log_path}")
        try:
            # Alive after the answer too: a child that failed to bind may let something else answer.
            if httpx.get(url, timeout=2).status_code == 200 and process.poll() is None:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{name} not healthy after {timeout_s:.0f}s; see {log_path}")


def stop_process(process: subprocess.Popen | None, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
