"""CPU seconds per process of a server under test, read from /proc, by the role each process plays; and the
memory figures of a process's /proc status.

A run's figure is the difference of two snapshots of every process below the server's top processes
(threads included: /proc/<pid>/stat counts them in the process). vLLM's engine core and its workers are
"the engine"; everything else (our proxy, tritonserver, each backend stub; vLLM's API server) is what a
generated token costs outside it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from launcher.lifecycle import descendants, parent_pids

ENGINE_ROLES = ("engine core", "engine worker")
_TICKS = os.sysconf("SC_CLK_TCK")


def role(pid: int) -> str | None:
    """What process `pid` is, by its command line; None if it is gone."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    command = " ".join(part.decode(errors="replace") for part in argv if part)
    if command.startswith("VLLM::EngineCore"):
        return "engine core"
    if command.startswith("VLLM::Worker"):
        return "engine worker"
    if "triton_python_backend_stub" in command:
        model = next((Path(part).parent.parent.name for part in command.split() if part.endswith("model.py")), "?")
        return f"{model} stub"
    if "tritonserver" in command.split(" ", 1)[0]:
        return "tritonserver"
    if "openai_proxy" in command:
        return "proxy"
    if "vllm.entrypoints.openai.api_server" in command:
        return "vLLM API server"
    return "other"


def status_bytes(pid: int, *fields: str) -> tuple[int, ...] | None:
    """The kB fields of /proc/<pid>/status (``"VmRSS"``, ``"VmHWM"``, ...) in bytes; None if `pid` is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return tuple(int(re.search(rf"^{name}:\s+(\d+) kB", status, re.MULTILINE)[1]) * 1024 for name in fields)


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of `pid` (all its threads); None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


@dataclass(frozen=True)
class Snapshot:
    seconds: dict[int, tuple[str, float]]  # pid -> (role, CPU seconds so far)

    @classmethod
    def take(cls, roots: Iterable[int]) -> Snapshot:
        parents = parent_pids()
        seconds = {}
        for root in roots:
            for pid in descendants(root, parents):
                name, used = role(pid), cpu_seconds(pid)
                if name is not None and used is not None:
                    seconds[pid] = (name, used)
        return cls(seconds)

    def since(self, before: Snapshot) -> dict[str, float]:
        """CPU seconds each role used between `before` and this snapshot (processes that started in between
        count from zero; those that ended in between are not seen)."""
        used: dict[str, float] = {}
        for pid, (name, now) in self.seconds.items():
            used[name] = used.get(name, 0.0) + now - before.seconds.get(pid, (name, 0.0))[1]
        return used


def outside_engine(used: dict[str, float]) -> float:
    return sum(seconds for name, seconds in used.items() if name not in ENGINE_ROLES)
