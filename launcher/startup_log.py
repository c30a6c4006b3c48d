"""What tritonserver's log says while a stack starts: the phases it has passed, and why a model failed.

The log is the one place that hears of every step (Triton's model loads, and vLLM's engine inside the
`vlm` stub, whose output goes to the same file); `StartupLog` reads what is new in it, line by line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# A log line that marks a phase, and how to say it.
PHASES = (
    (re.compile(r"successfully loaded '(\w+)'"), "model {} loaded"),
    (re.compile(r"Initializing a V1 LLM engine"), "vLLM: engine core started"),
    (re.compile(r"Starting to load model"), "vLLM: loading the weights"),
    (re.compile(r"Loading weights took ([\d.]+) seconds"), "vLLM: weights loaded ({} s)"),
    (re.compile(r"Warming up model for the compilation"), "vLLM: compiling and warming up the model"),
    (re.compile(r"saved AOT compiled function"), "vLLM: model compiled (kept for the next start)"),
    (re.compile(r"CPU KV cache size: ([\d,]+) tokens"), "vLLM: KV cache of {} tokens"),
    (re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"),
     "vLLM: engine ready (profile, KV cache, warm-up took {} s)"),
    (re.compile(r"Started GRPCInferenceService"), "tritonserver up: every model loaded"),
)
FAILED_LOAD = re.compile(r"failed to load '(\w+)' version \d+: (.*?)\"?$")
# An exception's last line in a traceback ("ValueError: ..."), maybe behind vLLM's process prefix.
EXCEPTION_LINE = re.compile(r"^(?:\(\w+ pid=\d+\) )?((?:[\w.]+\.)?\w*(?:Error|Exception): .+)$")


@dataclass(frozen=True)
class LoadFailure:
    model: str
    reason: str


def load_failure(log: str) -> LoadFailure | None:
    """The first model that failed to load, with the last exception line before Triton said so (the root
    cause: vLLM's engine core raises it, the stub then only says that the engine failed)."""
    lines = log.splitlines()
    for index, line in enumerate(lines):
        failed = FAILED_LOAD.search(line)
        if failed is None:
            continue
        causes = [m[1] for m in map(EXCEPTION_LINE.match, lines[:index]) if m]
        reason = causes[-1] if causes else failed[2]
        return LoadFailure(failed[1], reason.strip())
    return None


class StartupLog:
    """Reads the lines added to ``path`` since the last call."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.start = self.offset = path.stat().st_size if path is not None and path.exists() else 0

    def new_phases(self) -> list[str]:
        if self.path is None or not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        self.offset += end
        phases = []
        for line in data[:end].decode(errors="replace").splitlines():
            phases += [say.format(*m.groups()) for pattern, say in PHASES if (m := pattern.search(line))]
        return phases

    def failure(self) -> LoadFailure | None:
        """Why a model failed to load in this start (what the log holds from where it began)."""
        if self.path is None or not self.path.exists():
            return None
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return load_failure(f.read().decode(errors="replace"))
