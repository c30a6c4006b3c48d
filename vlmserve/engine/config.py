"""The engine's settings: one object, written by the repository generator as `vlm/1/engine.json` and passed
through whole to vLLM as AsyncEngineArgs (as Triton's vllm_backend does with its `model.json`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONFIG_FILE = "engine.json"


@dataclass
class EngineConfig:
    """`checkpoint` is the model; `args` are vLLM's AsyncEngineArgs fields (dtype, tensor_parallel_size,
    gpu_memory_utilization, max_model_len, kv_cache_memory_bytes, enforce_eager, quantization, ...)."""

    checkpoint: str
    args: dict = field(default_factory=dict)

    def write(self, directory: Path) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> EngineConfig:
        return cls(**json.loads((Path(directory) / CONFIG_FILE).read_text()))

    def engine_args(self) -> dict:
        return {"model": self.checkpoint, **self.args}
