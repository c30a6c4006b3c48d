"""One line per start-up phase as it happens, with the time since the start began."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

# What reports a phase: a line of text, without the time.
Report = Callable[[str], None]


def silent(_: str) -> None:
    """The report of starts nobody watches (tests' stacks, benchmarks)."""


class Progress:
    """``progress("tritonserver up")`` prints ``[  12.3 s] tritonserver up`` at once."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", file=self.out, flush=True)
