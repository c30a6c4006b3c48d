"""Write a deployable Triton model repository for a checkpoint and a target.

`cpu`: the ViT is the exported ONNX graph run by ONNX Runtime inside a Python-backend model, with a
thread count that leaves the LLM its cores (default from os.cpu_count()).
`gpu`: the ViT is a TensorRT plan with one instance group per GPU (`--gpus 0,1,2,3`).
The `vlm` model runs vLLM; `vlm/1/engine.json` holds the engine's arguments (tensor parallel size,
memory, context, ...), passed through whole.
`--role vit-server` writes a ViT server's repository instead: `preprocess`, `vit` and `encode`, the entry
point that LLM hosts started with `--vit-endpoints host:port,...` call over gRPC (those then have no
`preprocess` and `vit` of their own, unless the list names `local`: then they host all three too).
Both targets: `vit_cache` holds ViT outputs for every `vlm` instance (`--vit-cache-mb 0` turns it off), and
the media limits (`--max-pixels`, `--max-frames`, `--video-max-pixels`, ...) go to `preprocess` and
`vlm` alike (`vlm` keys the cache on them). The Python models' code is copied from
`model_repository/`; `config.pbtxt` is written here.

    python -m export.generate_repository --checkpoint CKPT --target cpu --vit-onnx vit.onnx --out REPO
    python -m export.generate_repository --checkpoint CKPT --target gpu --vit-engine vit.plan --gpus 0,1 --out REPO
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from export.build_trt_engine import ProcessorLimits, read_profile
from vlmserve.contracts import ENCODE, PREPROCESS, VIT, VIT_CACHE, VLM, TensorSpec
from vlmserve.engine.config import CONFIG_FILE, EngineConfig
from export.repository_options import (DEFAULT_CPU_KV_CACHE_BYTES, DEFAULT_GPU_MEMORY_UTILIZATION, MEDIA_PARAMETERS,
                                       ROLES, VIT_SERVER, RepositoryOptions, add_repository_arguments,
                                       repository_options)
from vlmserve.media.settings import capped_max_pixels
from vlmserve.vit.pool import LOCAL, parse_endpoints
from vlmserve.vit.settings import EncodeSettings, VitCacheSettings, VitRunnerSettings
from vlmserve.vlm_settings import VlmSettings
from vlmserve.vit.packing import CPU_MAX_PATCHES_PER_CALL, MAX_PATCHES_PER_CALL

SOURCE_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"


def default_vit_cpu_threads(cpu_count: int, vit_instances: int) -> int:
    """ONNX Runtime threads per CPU ViT instance: half the cores, the other half are the LLM's."""
    return max(1, (cpu_count - cpu_count // 2) // vit_instances)


def default_vit_max_patches(target: str) -> int:
    return MAX_PATCHES_PER_CALL if target == "gpu" else CPU_MAX_PATCHES_PER_CALL


# Where a checkpoint's config says its context length, as vLLM reads it (the least of those present).
CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                       "max_sequence_length", "max_seq_length", "seq_len")


def checkpoint_max_model_len(checkpoint: Path) -> int:
    """The context length a checkpoint was trained for (its config.json, or its text_config's)."""
    config = json.loads((checkpoint / "config.json").read_text())
    lengths = [int(section[key]) for section in (config, config.get("text_config") or {})
               for key in CONTEXT_LENGTH_KEYS if isinstance(section.get(key), (int, float))]
    if not lengths:
        raise ValueError(f"{checkpoint / 'config.json'} names no context length: pass --max-model-len")
    return min(lengths)


def engine_config(opts: RepositoryOptions) -> EngineConfig:
    """The engine's arguments, as vLLM names them. The context length is always explicit, so that the proxy
    and `/v1/models` know it without asking vLLM."""
    on_gpu = opts.target == "gpu"
    args = {"dtype": opts.dtype, "enable_prefix_caching": opts.enable_prefix_caching,
            "max_model_len": (opts.max_model_len or opts.llm_engine_args.get("max_model_len")
                              or checkpoint_max_model_len(opts.checkpoint)),
            "max_num_seqs": opts.max_num_seqs,
            "max_num_batched_tokens": opts.max_num_batched_tokens, "block_size": opts.kv_block_size,
            "enforce_eager": opts.enforce_eager, "quantization": opts.quantization,
            "tensor_parallel_size": opts.tensor_parallel_size or (len(opts.gpus) if on_gpu else 1)}
    if on_gpu:
        args["gpu_memory_utilization"] = opts.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
        if opts.kv_cache_bytes:
            args["kv_cache_memory_bytes"] = opts.kv_cache_bytes
    else:
        args["kv_cache_memory_bytes"] = opts.kv_cache_bytes or DEFAULT_CPU_KV_CACHE_BYTES
    args = {k: v for k, v in args.items() if v not in (0, None) or isinstance(v, bool)}
    return EngineConfig(str(opts.checkpoint.resolve()), {**args, **opts.llm_engine_args})


def _tensor(spec: TensorSpec) -> str:
    extra = " optional: true" if spec.optional else ""
    return f'  {{ name: "{spec.name}" data_type: {spec.dtype} dims: [ {", ".join(map(str, spec.dims))} ]{extra} }}'


def _io(kind: str, specs: tuple[TensorSpec, ...]) -> str:
    return f"{kind} [\n" + ",\n".join(map(_tensor, specs)) + "\n]\n"


def _parameters(values: dict[str, object]) -> str:
    return "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in values.items())


def _config(model: type, backend: str, instances: str, params: dict[str, object] | None = None,
            decoupled: bool = False, comment: str = "") -> str:
    """config.pbtxt of ``model``, a class of vlmserve.contracts (its name, inputs and outputs)."""
    text = "".join(f"# {line}\n" for line in comment.splitlines())
    text += f'name: "{model.NAME}"\n{backend}\nmax_batch_size: 0\n'
    if decoupled:
        text += "model_transaction_policy { decoupled: true }\n"
    text += _io("input", model.inputs) + _io("output", model.outputs) + instances
    return text + _parameters(params or {})


def _cpu_instances(count: int) -> str:
    return f"instance_group [ {{ kind: KIND_CPU count: {count} }} ]\n"


def _gpu_instances(gpus: list[int], count: int) -> str:
    groups = ",\n".join(f"  {{ kind: KIND_GPU count: {count} gpus: [ {gpu} ] }}" for gpu in gpus)
    return f"instance_group [\n{groups}\n]\n"


VIT_BATCHING = """No dynamic_batching: the patch dimension is ragged, and Triton batches ragged inputs of
a TensorRT plan only as flattened 1-D tensors and scatters outputs only in the shape of an input
(image_embeds has a quarter of the rows of pixel_values). The vlm model batches instead: it packs all
media of a request into calls of at most vit_max_patches patches (vlmserve/vit/packing.py);
a larger medium goes alone. On GPU the engine profile's max covers the largest image."""


def vit_config(opts: RepositoryOptions) -> str:
    if opts.target == "gpu":
        return _config(VIT, 'platform: "tensorrt_plan"', _gpu_instances(opts.gpus, opts.vit_instances_per_gpu),
                       comment=VIT_BATCHING)
    threads = opts.vit_cpu_threads or default_vit_cpu_threads(os.cpu_count() or 1, opts.vit_cpu_instances)
    settings = VitRunnerSettings(onnx_path=str(Path(opts.vit_onnx).resolve()), intra_op_threads=threads)
    return _config(VIT, 'backend: "python"', _cpu_instances(opts.vit_cpu_instances), settings.parameters(),
                   comment=VIT_BATCHING)


def _media_parameters(opts: RepositoryOptions) -> dict[str, object]:
    unknown = set(opts.media) - set(MEDIA_PARAMETERS)
    if unknown:
        raise ValueError(f"unknown media settings {sorted(unknown)}; known: {', '.join(MEDIA_PARAMETERS)}")
    return {"checkpoint_dir": opts.checkpoint.resolve(), **opts.media}


def preprocess_config(opts: RepositoryOptions) -> str:
    return _config(PREPROCESS, 'backend: "python"', _cpu_instances(opts.preprocess_instances),
                   _media_parameters(opts))


def vit_cache_config(opts: RepositoryOptions) -> str:
    # Exactly one instance: the cache is shared by all vlm instances only if it exists once.
    settings = VitCacheSettings(max_bytes=int(opts.vit_cache_mb * 2**20))
    return _config(VIT_CACHE, 'backend: "python"', _cpu_instances(1), settings.parameters())


def vlm_config(opts: RepositoryOptions) -> str:
    settings = VlmSettings(checkpoint_dir=str(opts.checkpoint.resolve()),
                           served_model_name=opts.served_model_name or opts.checkpoint.resolve().name,
                           vit_max_patches=opts.vit_max_patches or default_vit_max_patches(opts.target),
                           vit_cache=opts.vit_cache_mb > 0, vit_endpoints=",".join(parse_endpoints(opts.vit_endpoints)),
                           max_model_len=int(engine_config(opts).args["max_model_len"]))
    # One instance: the engine batches all requests itself (and spans GPUs with tensor parallelism).
    return _config(VLM, 'backend: "python"', _cpu_instances(1), {**_media_parameters(opts), **settings.parameters()},
                   decoupled=True, comment=f"The engine's settings: 1/{CONFIG_FILE}")


def encode_config(opts: RepositoryOptions) -> str:
    settings = EncodeSettings(checkpoint_dir=str(opts.checkpoint.resolve()),
                              vit_max_patches=opts.vit_max_patches or default_vit_max_patches(opts.target))
    # One instance serves many media at once (it answers each request when its medium is encoded).
    return _config(ENCODE, 'backend: "python"', _cpu_instances(1), {**_media_parameters(opts), **settings.parameters()})


CONFIGS = {PREPROCESS.NAME: preprocess_config, VIT.NAME: vit_config, VIT_CACHE.NAME: vit_cache_config,
           VLM.NAME: vlm_config, ENCODE.NAME: encode_config}


def hosted_models(opts: RepositoryOptions) -> list[str]:
    """The models of the repository for `opts`: by its role, without the cache when it is off and without the
    vision models where ViT servers do that work."""
    vision = [PREPROCESS.NAME, VIT.NAME]
    if opts.role == VIT_SERVER:
        return vision + [ENCODE.NAME]
    endpoints = parse_endpoints(opts.vit_endpoints)
    if endpoints:  # ViT servers do the vision work, this host too where it is one of them (`local`)
        vision = vision + [ENCODE.NAME] if LOCAL in endpoints else []
    return vision + [VLM.NAME] + ([VIT_CACHE.NAME] if opts.vit_cache_mb > 0 else [])


def check_vit_profile(opts: RepositoryOptions) -> None:
    """Refuse settings the TensorRT plan cannot run: a call is at most vit_max_patches patches, or one
    whole image or video frame (the largest by max_pixels / video_max_pixels), and each must fit the
    max of the plan's optimization profile."""
    _, _, profile_max = read_profile(opts.vit_engine)
    limits = ProcessorLimits.from_checkpoint(opts.checkpoint)

    def patches(pixels: object) -> int:
        return capped_max_pixels(int(pixels), limits.patch_size) // limits.patch_size**2

    largest = {"vit_max_patches": opts.vit_max_patches or default_vit_max_patches(opts.target),
               "max_pixels": patches(opts.media.get("max_pixels", limits.max_pixels))}
    if "video_max_pixels" in opts.media:
        largest["video_max_pixels"] = patches(opts.media["video_max_pixels"])
    for setting, count in largest.items():
        if count > profile_max:
            raise ValueError(f"{setting} allows vit calls of {count} patches, but the TensorRT plan "
                             f"{opts.vit_engine} was built for at most {profile_max}: lower it, or build the "
                             "plan for more (python -m export.vit_engine --max-images N)")


def generate_repository(opts: RepositoryOptions) -> Path:
    """Write the repository to `opts.out` (replacing what was there) and return it."""
    if opts.target not in ("cpu", "gpu"):
        raise ValueError(f"unknown target {opts.target!r}")
    if opts.role not in ROLES:
        raise ValueError(f"unknown role {opts.role!r}")
    if opts.role == VIT_SERVER and opts.vit_endpoints:
        raise ValueError("a ViT server (--role vit-server) encodes media itself: it takes no --vit-endpoints")
    models = hosted_models(opts)  # a malformed --vit-endpoints is refused here, before anything is written
    if VIT.NAME in models:
        if opts.target == "cpu" and opts.vit_onnx is None:
            raise ValueError("the cpu target needs --vit-onnx")
        if opts.target == "gpu" and opts.vit_engine is None:
            raise ValueError("the gpu target needs --vit-engine")
        if opts.target == "gpu":
            check_vit_profile(opts)
    config = engine_config(opts) if VLM.NAME in models else None  # its errors before anything is removed
    if opts.out.exists():
        shutil.rmtree(opts.out)
    for name in models:
        version = opts.out / name / "1"
        version.mkdir(parents=True)
        (opts.out / name / "config.pbtxt").write_text(CONFIGS[name](opts))
        if name == VIT.NAME and opts.target == "gpu":
            shutil.copy2(opts.vit_engine, version / "model.plan")
            continue
        if config is not None and name == VLM.NAME:
            config.write(version)
        shutil.copy2(SOURCE_REPOSITORY / name / "1" / "model.py", version / "model.py")
    return opts.out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--target", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--vit-onnx", type=Path, help="the exported vision tower of the cpu target")
    add_repository_arguments(parser, gpu=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    print(generate_repository(repository_options(args, args.checkpoint, args.out, args.target, args.vit_onnx)))


if __name__ == "__main__":
    main()
