"""Cache of built TensorRT ViT engines, so re-running the GPU export is free.

An entry is a directory ``<cache>/<digest>/`` holding ``vit.plan`` and ``key.json``; the key names
everything the plan depends on: the checkpoint's vision tower (a content hash of its config and
weights), the precision, the optimization profile, the TensorRT version and the GPU model (plans
do not move between GPU architectures). ``key.json`` is written last and the directory is renamed
into place, so a half-built entry is never found. Nothing here needs TensorRT.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PLAN_NAME = "vit.plan"
KEY_NAME = "key.json"
VISION_PREFIXES = ("model.visual.", "visual.")  # as export.vision_onnx.load_vision_tower reads them
READ_CHUNK = 16 * 2**20


def _tensor_bytes(file, start: int, stop: int, digest) -> None:
    file.seek(start)
    left = stop - start
    while left:
        chunk = file.read(min(READ_CHUNK, left))
        if not chunk:
            raise ValueError(f"{file.name} is truncated")
        digest.update(chunk)
        left -= len(chunk)


def vision_fingerprint(checkpoint_dir: str | Path) -> str:
    """sha256 of the vision config and every vision-tower tensor (name, dtype, shape, bytes).

    Reads only the vision tensors' byte ranges from the safetensors files (a 72B checkpoint's
    tower is ~1.3 GB), so the language model is neither read nor part of the key.
    """
    checkpoint_dir = Path(checkpoint_dir)
    digest = hashlib.sha256()
    config = json.loads((checkpoint_dir / "config.json").read_text())
    digest.update(json.dumps(config.get("vision_config"), sort_keys=True).encode())
    found = False
    for path in sorted(checkpoint_dir.glob("*.safetensors")):
        with open(path, "rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(header_size))
            for name in sorted(n for n in header if n.startswith(VISION_PREFIXES)):
                entry = header[name]
                digest.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
                start, stop = entry["data_offsets"]
                _tensor_bytes(file, 8 + header_size + start, 8 + header_size + stop, digest)
                found = True
    if not found:
        raise FileNotFoundError(f"no vision tower weights in {checkpoint_dir}/*.safetensors")
    return digest.hexdigest()


@dataclass(frozen=True)
class EngineKey:
    checkpoint: str  # vision_fingerprint
    precision: str
    profile: tuple[int, int, int]  # min, opt, max patches
    tensorrt: str  # trt.__version__
    gpu: str  # build_trt_engine.cuda_device_name()

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "profile": list(self.profile)}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()[:32]


class EngineCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry(self, key: EngineKey) -> Path:
        return self.root / key.digest()

    def lookup(self, key: EngineKey) -> Path | None:
        """The cached plan for ``key``, or None (also when the key file describes another key)."""
        entry = self.entry(key)
        try:
            stored = json.loads((entry / KEY_NAME).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        plan = entry / PLAN_NAME
        return plan if stored == key.as_json() and plan.is_file() else None

    def get_or_build(self, key: EngineKey, build: Callable[[Path], None]) -> tuple[Path, bool]:
        """(plan path, whether it was built now); ``build(path)`` writes a plan to ``path`` on a miss."""
        cached = self.lookup(key)
        if cached is not None:
            return cached, False
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".building-", dir=self.root))
        try:
            build(staging / PLAN_NAME)
            (staging / KEY_NAME).write_text(json.dumps(key.as_json(), indent=2, sort_keys=True) + "\n")
            entry = self.entry(key)
            if entry.exists():  # a stale or foreign entry under the same digest
                shutil.rmtree(entry)
            os.replace(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return entry / PLAN_NAME, True
