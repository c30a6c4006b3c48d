"""The `llm` model's engine choice and settings: one object, written by the repository generator as
`llm/1/engine.json` and passed through whole to the engine (as Triton's vllm_backend does with
its `model.json`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlmserve.llm_serving.engine import Engine, OutputCallback

ENGINES = ("vllm", "native")
CONFIG_FILE = "engine.json"


@dataclass
class EngineConfig:
    """`engine` picks the implementation; `args` are its own arguments, unchanged.

    vllm: vLLM's AsyncEngineArgs fields (model, dtype, tensor_parallel_size, gpu_memory_utilization,
    max_model_len, kv_cache_memory_bytes, enforce_eager, quantization, enable_prefix_caching, ...).
    native: vlmserve.engine.LLMEngine's keyword arguments, plus torch_threads; `checkpoint` is the model.
    """

    engine: str
    checkpoint: str
    args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown LLM engine {self.engine!r}; known: {', '.join(ENGINES)}")

    def write(self, directory: Path) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> "EngineConfig":
        return cls(**json.loads((Path(directory) / CONFIG_FILE).read_text()))

    def engine_factory(self) -> Callable[[OutputCallback], Engine]:
        """What LLMServer calls to build the engine (imports only the chosen engine's dependencies)."""
        if self.engine == "vllm":
            from vlmserve.llm_serving.vllm_engine import VllmEngine

            return lambda on_output: VllmEngine({"model": self.checkpoint, **self.args}, on_output)
        from vlmserve.llm_serving.native_engine import NativeEngine

        return lambda on_output: NativeEngine(self.checkpoint, self.args, on_output)
