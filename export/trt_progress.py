"""Progress output for TensorRT engine builds, which can run for many minutes.

`PhaseLog` prints our own phases (parse, build, write) with their durations whatever the TensorRT
version; `progress_monitor` adds TensorRT's internal phases and steps where the installed TensorRT
has `IProgressMonitor` (10.0 and later).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

PREFIX = "[trt]"
STEP_LINES_PER_PHASE = 10  # a phase of thousands of steps (tactics) gets about this many lines


class PhaseLog:
    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        print(f"{PREFIX} {name} ...", file=self.stream, flush=True)
        start = time.perf_counter()
        yield
        print(f"{PREFIX} {name}: done in {time.perf_counter() - start:.1f}s", file=self.stream, flush=True)


def progress_monitor(trt, stream: TextIO = sys.stderr) -> object | None:
    """A ``trt.IProgressMonitor`` printing TensorRT's nested build phases, or None if this TensorRT has none."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):
        def __init__(self) -> None:
            base.__init__(self)  # the pybind11 trampoline must be initialised explicitly
            self.depth: dict[str, int] = {}
            self.steps: dict[str, int] = {}

        def _print(self, phase: str, text: str) -> None:
            print(f"{PREFIX} {'  ' * self.depth.get(phase, 0)}{text}", file=stream, flush=True)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.depth[phase_name] = 0 if parent_phase is None else self.depth.get(parent_phase, 0) + 1
            self.steps[phase_name] = num_steps
            self._print(phase_name, f"{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            total = self.steps.get(phase_name, 0)
            every = max(1, total // STEP_LINES_PER_PHASE)
            if total > 1 and (step + 1) % every == 0:
                self._print(phase_name, f"  {phase_name}: {step + 1}/{total}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            self.depth.pop(phase_name, None)
            self.steps.pop(phase_name, None)

    return Monitor()
