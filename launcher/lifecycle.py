"""What belongs to one deployment, so that none of it outlives a stop: its processes and its shared memory.

Every process a deployment starts (tritonserver, the backend stubs, what the stubs start in turn such as
vLLM's EngineCore and workers, the proxy) carries `DEPLOYMENT_ENV` in its environment, which children
inherit whatever process group or session they put themselves in; the Python backend's shared-memory
regions carry the deployment's own prefix. Other files in /dev/shm that its processes map (vLLM's message
queues, multiprocessing's semaphores) carry no prefix of ours, and their owners remove them only on a clean
exit: whoever kills those processes removes them. A deployment is named by its work directory, so a start in
the same directory finds what an earlier one left behind (a `kill -9` of tritonserver or of the server
that supervises it) and removes it before anything new starts.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DEPLOYMENT_ENV = "VLMSERVE_DEPLOYMENT"
SHM_DIR = Path("/dev/shm")


def _environ_tag(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return None
    for entry in environ.split(b"\0"):
        if entry.startswith(DEPLOYMENT_ENV.encode() + b"="):
            return entry.split(b"=", 1)[1].decode()
    return None


def parent_pids() -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state != "Z":
            parents[int(entry.name)] = int(ppid)
    return parents


def descendants(root: int, parents: dict[int, int]) -> set[int]:
    """`root` and every live process below it."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root] if root in parents else []
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found


def kill_and_wait(pids: Iterable[int], timeout_s: float = 5.0) -> None:
    """SIGKILL `pids` and wait until none of them is alive (or a zombie left to its parent)."""
    pids = set(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        pids &= parent_pids().keys()
        time.sleep(0.05)


def mapped_shm(pids: Iterable[int]) -> set[Path]:
    """The files in /dev/shm that `pids` map and that still exist."""
    files = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:  # gone, or not ours to read
            continue
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)  # address, perms, offset, device, inode, path
            if len(fields) == 6 and fields[5].startswith(f"{SHM_DIR}/") and not fields[5].endswith(" (deleted)"):
                files.add(Path(fields[5]))
    return files


@dataclass(frozen=True)
class Deployment:
    """The identity of one deployment: the tag on its processes and the prefix of its shm regions."""

    id: str

    @classmethod
    def of(cls, workdir: Path) -> Deployment:
        return cls(hashlib.sha256(str(workdir.resolve()).encode()).hexdigest()[:12])

    @property
    def shm_prefix(self) -> str:
        return f"vlmserve_{self.id}_"

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        """`env` with this deployment's tag added."""
        return {**env, DEPLOYMENT_ENV: self.id}

    def pids(self) -> set[int]:
        """Every live process that carries this deployment's tag."""
        return {pid for pid in parent_pids() if _environ_tag(pid) == self.id}

    def regions(self) -> list[Path]:
        return sorted(SHM_DIR.glob(self.shm_prefix + "*"))

    def kill(self, pids: Iterable[int]) -> None:
        """SIGKILL `pids` (processes of this deployment), then remove the files in /dev/shm they mapped that no
        process of the deployment still alive maps."""
        pids = set(pids)
        mapped = mapped_shm(pids)
        kill_and_wait(pids)
        for path in mapped - mapped_shm(self.pids()):
            path.unlink(missing_ok=True)

    def kill_orphans(self, keep_below: Iterable[int], dead: Iterable[int] = ()) -> set[int]:
        """Kill this deployment's processes that are no longer below any of `keep_below` (their parent died,
        as vLLM's EngineCore and workers outlive a killed `vlm` stub), or are below one of the `dead` processes
        that has not finished exiting; return their pids."""
        parents = parent_pids()
        kept = set().union(*(descendants(root, parents) for root in keep_below))
        kept -= set().union(*(descendants(pid, parents) for pid in dead))
        orphans = {pid for pid in parents if pid not in kept and _environ_tag(pid) == self.id}
        self.kill(orphans)
        return orphans

    def remove_all(self) -> None:
        """Kill every process of this deployment and remove its shm regions and files (on start and on stop)."""
        self.kill(self.pids())
        for region in self.regions():
            region.unlink(missing_ok=True)
