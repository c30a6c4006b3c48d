"""Build a TensorRT engine (.plan) for the exported Qwen2-VL vision tower.

Written against the TensorRT 10 Python API (weakly typed network + precision
flags). Needs ``tensorrt`` and a CUDA GPU; without them it exits with code 2.
Progress goes to stderr (``export.trt_progress``). ``export.vit_engine`` wraps
export + build with a cache keyed on the checkpoint.

CLI: ``python -m export.build_trt_engine VIT.onnx OUT.plan [--checkpoint CKPT] [--precision fp16]``

The profile covers the patch dimension N shared by all three inputs
(``pixel_values`` [N, C*T*P*P] float32, ``position_ids`` [N, 2] int64,
``segment_ids`` [N] int64; TensorRT 10 takes the int64 inputs as they are).
The ONNX model must be the ``--attention masked`` export: the default one
attends per segment with ONNX Runtime's contrib ops, which TensorRT cannot parse.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from export.trt_progress import PhaseLog, progress_monitor
from vlmserve.media.settings import MediaSettings

PRECISIONS = ("fp16", "bf16", "fp32")


class EngineBuildUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing, or this TensorRT lacks a needed feature."""


@dataclass(frozen=True)
class ProcessorLimits:
    """What bounds the patch count of one image; defaults are Qwen2VLImageProcessor's.

    ``from_checkpoint`` caps max_pixels as the served default does (``MediaSettings``), so the
    profile covers exactly the images the `preprocess` model produces.
    """

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> ProcessorLimits:
        """The served image limits (MediaSettings.from_checkpoint) and the checkpoint's patch geometry."""
        settings = MediaSettings.from_checkpoint(checkpoint_dir)
        config = json.loads((Path(checkpoint_dir) / "preprocessor_config.json").read_text())
        return cls(min_pixels=settings.min_pixels, max_pixels=settings.max_pixels,
                   patch_size=config.get("patch_size", cls.patch_size),
                   merge_size=config.get("merge_size", cls.merge_size))

    @property
    def merge_unit(self) -> int:
        """Patches per merged token: the merger reshapes N to N / merge_unit rows."""
        return self.merge_size**2

    def patch_profile(self, max_images: int = 1) -> tuple[int, int, int]:
        """(min, opt, max) patches: one smallest image, one largest, ``max_images`` largest."""
        per_patch, unit = self.patch_size**2, self.merge_unit
        min_patches = -(-self.min_pixels // per_patch // unit) * unit  # round up
        max_per_image = self.max_pixels // per_patch // unit * unit  # round down
        return min_patches, max_per_image, max_per_image * max_images


def profile_record(plan_path: str | Path) -> Path:
    """Where the profile a plan was built for is recorded: beside it. Reading it back from the plan
    itself needs TensorRT and a GPU; the repository generator needs neither."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".profile.json")


def write_profile(plan_path: str | Path, profile: tuple[int, int, int]) -> None:
    record = dict(zip(("min_patches", "opt_patches", "max_patches"), profile))
    profile_record(plan_path).write_text(json.dumps(record) + "\n")


def read_profile(plan_path: str | Path) -> tuple[int, int, int]:
    """(min, opt, max) patches of a plan built by this module or export.vit_engine; ValueError without a record."""
    try:
        record = json.loads(profile_record(plan_path).read_text())
        return record["min_patches"], record["opt_patches"], record["max_patches"]
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ValueError(f"no readable profile record {profile_record(plan_path)} beside the TensorRT plan; "
                         "build the plan with python -m export.vit_engine (or export.build_trt_engine)") from exc


def check_patch_profile(profile: tuple[int, int, int], merge_unit: int) -> None:
    min_patches, opt_patches, max_patches = profile
    if not 0 < min_patches <= opt_patches <= max_patches:
        raise ValueError(f"need 0 < min <= opt <= max patches, got {profile}")
    if any(n % merge_unit for n in profile):
        raise ValueError(f"patch counts must be multiples of {merge_unit}, got {profile}")


def check_tensorrt_graph(onnx_path: str | Path) -> None:
    """ValueError unless ``onnx_path`` uses only standard ONNX domains (the ``--attention masked`` export)."""
    import onnx  # only the graph's header: external weights stay on disk

    domains = {o.domain for o in onnx.load(str(onnx_path), load_external_data=False).opset_import}
    foreign = domains - {"", "ai.onnx"}
    if foreign:
        raise ValueError(f"{onnx_path} uses operator domains {sorted(foreign)} that TensorRT cannot parse; "
                         "export it with `python -m export.vision_onnx CKPT OUT.onnx --attention masked`")


def cuda_device_count() -> int:
    """GPUs visible to the CUDA driver (0 without a driver), without torch or cuda-python."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cuda_device_name(index: int = 0) -> str:
    """``"<name> sm_<major><minor>"`` of a GPU: a plan runs only on the GPU model it was built for."""
    cuda = ctypes.CDLL("libcuda.so.1")
    device, name = ctypes.c_int(), ctypes.create_string_buffer(256)
    major, minor = ctypes.c_int(), ctypes.c_int()
    if (cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), index)
            or cuda.cuDeviceGetName(name, len(name), device)
            or cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # COMPUTE_CAPABILITY_MAJOR
            or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)):  # COMPUTE_CAPABILITY_MINOR
        raise EngineBuildUnavailable(f"cannot query CUDA device {index}")
    return f"{name.value.decode()} sm_{major.value}{minor.value}"


def import_tensorrt():
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there, libnvinfer is not
        raise EngineBuildUnavailable(
            f"tensorrt is not importable ({exc}); install TensorRT 10 "
            "(pip install tensorrt) on a machine with a CUDA GPU"
        ) from exc
    if cuda_device_count() == 0:
        raise EngineBuildUnavailable("no CUDA GPU found: TensorRT engines are built on the target GPU")
    return trt


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    patch_profile: tuple[int, int, int],
    precision: str = "fp16",
    workspace_gib: float | None = None,
) -> Path:
    """Parse ``onnx_path``, build for ``precision`` over (min, opt, max) patches, write ``plan_path``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt = import_tensorrt()
    check_tensorrt_graph(onnx_path)
    log = PhaseLog()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so external weight files next to the model are found.
    with log.phase(f"parsing {onnx_path}"):
        if not parser.parse_from_file(str(onnx_path)):
            errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")

    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32, not 10-bit-mantissa TF32
    else:
        flag = getattr(trt.BuilderFlag, precision.upper(), None)
        if flag is None:  # TensorRT 11 removed the weak-typing precision flags
            raise EngineBuildUnavailable(
                f"TensorRT {trt.__version__} has no BuilderFlag.{precision.upper()}; "
                "use TensorRT 10 or --precision fp32"
            )
        config.set_flag(flag)

    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        # Only the leading patch dimension is dynamic (-1); the rest stay as exported.
        shapes = [tuple(n if d == -1 else d for d in tensor.shape) for n in patch_profile]
        profile.set_shape(tensor.name, *shapes)
    config.add_optimization_profile(profile)
    monitor = progress_monitor(trt)
    if monitor is not None:
        config.progress_monitor = monitor

    with log.phase(f"building the {precision} engine for {patch_profile[0]}..{patch_profile[2]} patches"):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    plan_path = Path(plan_path)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    with log.phase(f"writing {plan_path}"):
        plan_path.write_bytes(serialized)  # IHostMemory is a buffer
        write_profile(plan_path, patch_profile)
    return plan_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx_path", type=Path)
    parser.add_argument("plan_path", type=Path)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16")
    parser.add_argument(
        "--checkpoint", type=Path, help="read min/max_pixels from its preprocessor_config.json"
    )
    parser.add_argument("--max-images", type=int, default=1, help="largest images per call")
    parser.add_argument("--min-patches", type=int, help="default: min_pixels / patch_size^2")
    parser.add_argument("--opt-patches", type=int, help="default: max_pixels / patch_size^2")
    parser.add_argument(
        "--max-patches", type=int, help="default: max_pixels / patch_size^2 * --max-images"
    )
    parser.add_argument("--workspace-gib", type=float, help="default: TensorRT's (all GPU memory)")
    args = parser.parse_args(argv)

    try:
        limits = ProcessorLimits.from_checkpoint(args.checkpoint) if args.checkpoint else ProcessorLimits()
    except FileNotFoundError as exc:
        parser.error(f"--checkpoint: {exc}")
    given = (args.min_patches, args.opt_patches, args.max_patches)
    profile = tuple(
        n if n is not None else default for n, default in zip(given, limits.patch_profile(args.max_images))
    )
    try:
        check_patch_profile(profile, limits.merge_unit)
        plan = build_engine(args.onnx_path, args.plan_path, profile, args.precision, args.workspace_gib)
    except ValueError as exc:
        parser.error(str(exc))
    except EngineBuildUnavailable as exc:
        print(f"build_trt_engine: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(f"wrote {plan} ({args.precision}, patches min/opt/max {profile})")


if __name__ == "__main__":
    main()
