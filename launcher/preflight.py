"""Checks before any process starts: ports, the checkpoint, and the memory the settings need.

Each failure is one line naming what to change; `launcher.serve` prints it and exits with code 2.
Nothing here imports torch or vLLM, so a failing check answers within a second or two.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from export.generate_repository import engine_config, hosted_models
from export.repository_options import RepositoryOptions
from vlmserve.contracts import ENCODE, VIT, VIT_CACHE, VLM
from vlmserve.media.settings import MediaSettings, capped_max_pixels
from vlmserve.vit.packing import CPU_MAX_PATCHES_PER_CALL, vit_memory_bound

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2,
               "F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "F8_E4M3": 1}
# Proportional set size (shared pages split among processes) of each process of a CPU stack besides its
# weights, KV cache and ViT, measured on a running stack: tritonserver 42 MiB, the vit_cache stub 19,
# each preprocess stub 460 (transformers' processors, torch), the vlm stub 681, vLLM's engine core 626
# and its worker about 830 (torch and the compiled graphs), the proxy about 100.
TRITONSERVER_BYTES = 50 * 2**20
PREPROCESS_BYTES = 470 * 2**20
VLM_STUB_BYTES = 700 * 2**20
ENGINE_CORE_BYTES = 650 * 2**20
ENGINE_WORKER_BYTES = 850 * 2**20
PROXY_BYTES = 120 * 2**20
VIT_CACHE_STUB_BYTES = 20 * 2**20
ENCODE_STUB_BYTES = PREPROCESS_BYTES  # the same imports (the media path) and the ViT's outputs in flight


class PreflightError(Exception):
    """A setting the host cannot serve; the message says which and what to do."""


def check_ports(ports: dict[str, int]) -> None:
    """Every port (by the flag that sets it) free on 127.0.0.1."""
    for flag, port in ports.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as exc:
                raise PreflightError(f"port {port} is taken ({exc.strerror}): choose another with {flag}") from None


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 100 * 2**20:
            raise ValueError("header too large")
        return json.loads(f.read(size))


def check_checkpoint(checkpoint: Path) -> None:
    """The checkpoint has a readable config, tokenizer and weights."""
    if not checkpoint.is_dir():
        raise PreflightError(f"checkpoint {checkpoint} is not a directory (--checkpoint)")
    try:
        json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise PreflightError(f"checkpoint {checkpoint}: config.json unreadable ({exc})") from None
    if not ((checkpoint / "tokenizer.json").is_file()
            or ((checkpoint / "vocab.json").is_file() and (checkpoint / "merges.txt").is_file())):
        raise PreflightError(f"checkpoint {checkpoint}: no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    shards = sorted(checkpoint.glob("*.safetensors"))
    if not shards:
        raise PreflightError(f"checkpoint {checkpoint}: no *.safetensors weights")
    for shard in shards:
        try:
            _safetensors_header(shard)
        except (OSError, ValueError, struct.error) as exc:
            raise PreflightError(f"checkpoint {checkpoint}: {shard.name} unreadable ({exc})") from None


@dataclass(frozen=True)
class WeightCounts:
    """Parameters of a checkpoint, and the bytes they take as stored."""

    llm: int
    vision: int
    stored_bytes: int


def weight_counts(checkpoint: Path) -> WeightCounts:
    """Parameters of the LLM and of the vision tower, and the bytes of all of them as stored."""
    llm = vision = stored = 0
    for shard in sorted(checkpoint.glob("*.safetensors")):
        for name, info in _safetensors_header(shard).items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            if "visual." in name:
                vision += count
            else:
                llm += count
            stored += count * DTYPE_BYTES.get(info["dtype"], 2)
    return WeightCounts(llm, vision, stored)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # the engine's (the LLM's and its vision tower's), in the engine's dtype
    kv_cache: int
    vit: int  # vit_memory_bound for each ViT instance
    processes: int  # every process's own share besides those

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.vit + self.processes

    def parts(self) -> dict[str, int]:
        """Each part by the name messages and reports give it."""
        return {"LLM weights": self.weights, "KV cache": self.kv_cache, "ViT": self.vit, "processes": self.processes}


def memory_estimate(opts: RepositoryOptions) -> MemoryEstimate:
    """What a CPU stack with ``opts`` holds once it serves its largest request: the engine's share as the engine
    arguments the repository will pass (dtype and KV cache, `--llm-engine-args` included), the vision side's
    where this host runs it."""
    models = hosted_models(opts)
    counts = weight_counts(opts.checkpoint)
    weights = kv_cache = vit = 0
    processes = TRITONSERVER_BYTES
    if VLM.NAME in models:
        try:
            engine = engine_config(opts).args
        except ValueError as exc:
            raise PreflightError(str(exc)) from None
        dtype = engine["dtype"]
        # vLLM builds the whole Qwen2-VL, vision tower included, though our ViT encodes the media: a tower is
        # only left out when every modality's limit is 0, and then embeddings are refused too.
        weights = counts.stored_bytes if dtype == "auto" else (counts.llm + counts.vision) * DTYPE_BYTES.get(dtype, 4)
        kv_cache = int(engine["kv_cache_memory_bytes"])
        processes += VLM_STUB_BYTES + ENGINE_CORE_BYTES + ENGINE_WORKER_BYTES + PROXY_BYTES
    if VIT.NAME in models:
        config = json.loads((opts.checkpoint / "config.json").read_text())["vision_config"]
        patch, temporal = config.get("patch_size", 14), config.get("temporal_patch_size", 2)
        media = MediaSettings.from_checkpoint(opts.checkpoint).with_parameters(opts.media)
        largest_image = capped_max_pixels(max(media.max_pixels, media.video_max_pixels), patch) // patch**2
        vit = opts.vit_cpu_instances * vit_memory_bound(
            max(largest_image, opts.vit_max_patches or CPU_MAX_PATCHES_PER_CALL), 3 * temporal * patch**2,
            config["embed_dim"], 4 * counts.vision)
        processes += opts.preprocess_instances * PREPROCESS_BYTES
    if ENCODE.NAME in models:
        processes += ENCODE_STUB_BYTES
    if VIT_CACHE.NAME in models:
        processes += VIT_CACHE_STUB_BYTES + int(opts.vit_cache_mb * 2**20)
    return MemoryEstimate(weights, kv_cache, vit, processes)


def available_memory() -> int:
    """The host's MemAvailable in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_memory(estimate: MemoryEstimate, available: int) -> None:
    """The estimate fits in ``available``, or an error naming the setting to lower."""
    if estimate.total <= available:
        return
    biggest = max((estimate.kv_cache, "--kv-cache-bytes"), (estimate.vit, "--max-pixels or --vit-cpu-instances"),
                  (estimate.weights, "--llm-dtype bfloat16 or a smaller checkpoint"))
    parts = ", ".join(f"{name} {_gib(size)}" for name, size in estimate.parts().items())
    raise PreflightError(f"the settings need about {_gib(estimate.total)} of memory ({parts}) but this host "
                         f"has {_gib(available)} available: lower {biggest[1]}")
