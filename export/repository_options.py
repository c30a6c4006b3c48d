"""The deployment's settings, defined once: what `export.generate_repository` and `launcher.serve` take.

`RepositoryOptions` holds them (one default each); `add_repository_arguments` declares them as argparse
groups on either command line and `repository_options` reads them back, so both CLIs list, type and
default a setting alike (tests/test_serve_cli.py checks it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from vlmserve.media.settings import MediaSettings
from vlmserve.vit.packing import CPU_MAX_PATCHES_PER_CALL, MAX_PATCHES_PER_CALL

MEDIA_PARAMETERS = tuple(f.name for f in dataclasses.fields(MediaSettings))
# vLLM's KV cache on a CPU host.
DEFAULT_CPU_KV_CACHE_BYTES = 2 * 2**30
# vLLM's share of each GPU's memory: what the TensorRT ViT instances on the same GPUs need stays free.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.8
# What the media flags mean (defaults: the checkpoint's processor config, vlmserve/media/settings.py).
MEDIA_HELP = {
    "min_pixels": "smallest image size after resizing, in pixels",
    "max_pixels": "largest image size after resizing, in pixels (28x28 pixels make one visual token)",
    "video_min_pixels": "smallest video frame after resizing",
    "video_max_pixels": "largest video frame after resizing",
    "video_total_pixels": "pixel budget of one video's sampled frames together",
    "max_frames": "most frames sampled from one video",
    "video_fps": "frames sampled per second when a request names no fps",
    "max_image_pixels": "largest image accepted for decoding (source pixels; larger ones get a 400)",
    "max_video_pixels": "largest video accepted for decoding (sampled frames x source frame pixels)",
    "low_detail_max_pixels": 'max_pixels of an image part with detail "low"',
}


# What a deployment's tritonserver hosts: everything (one host), or the vision side alone (a ViT server that
# LLM hosts reach through --vit-endpoints).
VIT_SERVER = "vit-server"
ROLES = ("all", VIT_SERVER)


@dataclass
class RepositoryOptions:
    checkpoint: Path
    out: Path
    target: str = "cpu"
    role: str = "all"
    vit_endpoints: str = ""  # host:port,... of ViT servers; set: this host runs no `preprocess` and `vit` (unless
    # the list names `local`)
    vit_onnx: Path | None = None
    vit_engine: Path | None = None
    gpus: list[int] = field(default_factory=lambda: [0])
    vit_instances_per_gpu: int = 1
    vit_cpu_instances: int = 1
    vit_cpu_threads: int | None = None  # None: the cores the LLM leaves, per instance
    vit_max_patches: int | None = None  # packing budget per vit call (None: the target's default)
    vit_cache_mb: float = 512.0  # 0 turns the ViT embedding cache off
    media: dict[str, str] = field(default_factory=dict)  # MediaSettings overrides, e.g. {"max_frames": "64"}
    preprocess_instances: int = 2
    served_model_name: str | None = None  # the OpenAI API's model name; None: the checkpoint directory's name
    # The engine's settings (one EngineConfig, vlm/1/engine.json). 0 / None: vLLM's own default.
    llm_dtype: str | None = None  # None: float32 on cpu, bfloat16 on gpu
    max_model_len: int = 0  # 0: the checkpoint's context length
    max_num_seqs: int = 0
    max_num_batched_tokens: int = 0
    kv_block_size: int = 0  # tokens per paged KV cache block
    kv_cache_bytes: int = 0  # the KV pool; 0: DEFAULT_CPU_KV_CACHE_BYTES on cpu, a share of GPU memory on gpu
    gpu_memory_utilization: float = 0.0  # on gpu; 0: DEFAULT_GPU_MEMORY_UTILIZATION
    tensor_parallel_size: int = 0  # 0: one shard per GPU in `gpus` (1 on cpu)
    enforce_eager: bool = False  # no torch.compile / CUDA graphs (starts faster, decodes slower)
    quantization: str | None = None  # e.g. "fp8", "awq"
    enable_prefix_caching: bool = True
    llm_engine_args: dict = field(default_factory=dict)  # more engine arguments, passed through as they are

    @property
    def dtype(self) -> str:
        return self.llm_dtype or ("bfloat16" if self.target == "gpu" else "float32")


DEFAULTS = RepositoryOptions(checkpoint=Path(), out=Path())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_repository_arguments(parser: argparse.ArgumentParser, gpu: bool) -> None:
    """The deployment's settings as argument groups of ``parser``; `gpu`: also the GPU target's."""
    d = DEFAULTS
    model = parser.add_argument_group("model")
    model.add_argument("--served-model-name", help="the OpenAI API's model name (default: the checkpoint "
                       "directory's name)")

    llm = parser.add_argument_group("LLM engine (vLLM's engine arguments; 0: vLLM's default)")
    llm.add_argument("--max-model-len", type=int, default=d.max_model_len,
                     help="context length in tokens (default: the checkpoint's)")
    llm.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="most sequences in one step")
    llm.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                     help="most tokens in one step")
    llm.add_argument("--kv-cache-bytes", "--kv-cache-memory-bytes", type=int, default=d.kv_cache_bytes,
                     help=f"KV cache size in bytes (default: {DEFAULT_CPU_KV_CACHE_BYTES >> 30} GiB on cpu"
                          + (", sized by --gpu-memory-utilization on gpu)" if gpu else ")"))
    llm.add_argument("--kv-block-size", type=int, default=d.kv_block_size, help="tokens per KV cache block")
    llm.add_argument("--llm-dtype", default=d.llm_dtype, help="default: float32 on cpu, bfloat16 on gpu")
    llm.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size,
                     help="default: one shard per GPU in --gpus (1 on cpu)" if gpu else "shards of the LLM")
    if gpu:
        llm.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                         help=f"vLLM's share of each GPU (default {DEFAULT_GPU_MEMORY_UTILIZATION}: the rest "
                              "is the ViT's)")
    llm.add_argument("--enforce-eager", action="store_true", help="no torch.compile / CUDA graphs")
    llm.add_argument("--quantization", default=d.quantization, help="e.g. fp8, awq")
    llm.add_argument("--no-prefix-caching", action="store_true", help="turn the LLM's prefix cache off")
    llm.add_argument("--llm-engine-args", type=json.loads, default={},
                     help='more engine arguments as JSON, passed to vLLM whole, e.g. \'{"swap_space": 8}\'')

    media = parser.add_argument_group("media limits (default: the checkpoint's processor config)")
    types = typing.get_type_hints(MediaSettings)
    for name in MEDIA_PARAMETERS:
        media.add_argument(_flag(name), dest=name, type=types[name], help=MEDIA_HELP[name])

    vision = parser.add_argument_group("vision tower and preprocessing")
    vision.add_argument("--role", choices=ROLES, default=d.role,
                        help=f"all: the whole model on this host; {VIT_SERVER}: a ViT server (preprocess and vit, "
                             "reached over gRPC by LLM hosts started with --vit-endpoints)")
    vision.add_argument("--vit-endpoints", default=d.vit_endpoints,
                        help="gRPC host:port of ViT servers, comma-separated: images and videos are encoded "
                             "there (the least busy first) instead of on this host; 'local' in the list: on this "
                             "host too")
    if gpu:
        vision.add_argument("--vit-engine", type=Path, help="the TensorRT plan of the gpu target")
        vision.add_argument("--gpus", default="0", help="comma-separated GPU ids; one ViT instance group per GPU")
        vision.add_argument("--vit-instances-per-gpu", type=int, default=d.vit_instances_per_gpu)
    vision.add_argument("--vit-cpu-instances", type=int, default=d.vit_cpu_instances,
                        help="ViT instances of the cpu target")
    vision.add_argument("--vit-cpu-threads", type=int, default=d.vit_cpu_threads,
                        help="ONNX Runtime threads per ViT instance (default: the cores the LLM leaves)")
    vision.add_argument("--vit-max-patches", type=int, default=d.vit_max_patches,
                        help=f"packing budget per vit call (default: cpu {CPU_MAX_PATCHES_PER_CALL}"
                             + (f", gpu {MAX_PATCHES_PER_CALL})" if gpu else ")"))
    vision.add_argument("--vit-cache-mb", type=float, default=d.vit_cache_mb,
                        help="ViT embedding cache budget in MiB; 0: off")
    vision.add_argument("--preprocess-instances", type=int, default=d.preprocess_instances)


def repository_options(args: argparse.Namespace, checkpoint: Path, out: Path, target: str = "cpu",
                       vit_onnx: Path | None = None) -> RepositoryOptions:
    """The options that `add_repository_arguments` parsed into ``args``."""
    own = {f.name for f in dataclasses.fields(RepositoryOptions)} - {"checkpoint", "out", "target", "vit_onnx",
                                                                      "media", "enable_prefix_caching", "gpus"}
    values = {name: getattr(args, name) for name in own if hasattr(args, name)}
    if hasattr(args, "gpus"):
        values["gpus"] = [int(g) for g in args.gpus.split(",")]
    media = {name: str(getattr(args, name)) for name in MEDIA_PARAMETERS if getattr(args, name) is not None}
    return RepositoryOptions(checkpoint=checkpoint, out=out, target=target, vit_onnx=vit_onnx, media=media,
                             enable_prefix_caching=not args.no_prefix_caching, **values)
