"""Lowering the priority of a whole process, as the processes that carry the engine's output do."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def lower_priority(niceness: int) -> None:
    """Raise the nice value of every thread of this process by `niceness` (threads they start inherit it)."""
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that has just ended
            tid = int(task.name)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
