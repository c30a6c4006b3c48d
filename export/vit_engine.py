"""Checkpoint -> TensorRT ViT engine, through the engine cache: ONNX export and build only on a miss.

CLI: ``python -m export.vit_engine CHECKPOINT OUT.plan [--precision fp16] [--cache-dir DIR] [--max-images N]``

Exits with code 2 and a message when TensorRT or a CUDA GPU is missing (the key needs both).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from export import build_trt_engine
from export.engine_cache import EngineCache, EngineKey, vision_fingerprint
from export.trt_progress import PhaseLog

DEFAULT_CACHE_DIR = Path("build") / "trt-engines"


def cached_engine(checkpoint: Path, out: Path, precision: str, cache_dir: Path, max_images: int = 1,
                  workspace_gib: float | None = None) -> tuple[Path, bool]:
    """Write the engine for ``checkpoint`` to ``out``; returns (out, whether it was built now)."""
    trt = build_trt_engine.import_tensorrt()
    limits = build_trt_engine.ProcessorLimits.from_checkpoint(checkpoint)
    profile = limits.patch_profile(max_images)
    build_trt_engine.check_patch_profile(profile, limits.merge_unit)
    with PhaseLog().phase(f"hashing the vision tower of {checkpoint}"):
        fingerprint = vision_fingerprint(checkpoint)
    key = EngineKey(fingerprint, precision, profile, trt.__version__, build_trt_engine.cuda_device_name())

    def build(plan: Path) -> None:
        from export.vision_onnx import export_vision_onnx  # torch: only needed on a miss

        with tempfile.TemporaryDirectory() as tmp:
            # TensorRT parses only the standard-op graph (see export.vision_onnx).
            onnx_path = export_vision_onnx(checkpoint, Path(tmp) / "vit.onnx", attention="masked")
            build_trt_engine.build_engine(onnx_path, plan, profile, precision, workspace_gib)

    plan, built = EngineCache(cache_dir).get_or_build(key, build)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plan, out)
    build_trt_engine.write_profile(out, profile)
    return out, built


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--precision", choices=build_trt_engine.PRECISIONS, default="fp16")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--max-images", type=int, default=1,
                        help="largest images per vit call; the repository's --vit-max-patches must fit")
    parser.add_argument("--workspace-gib", type=float)
    args = parser.parse_args(argv)
    try:
        out, built = cached_engine(args.checkpoint, args.out, args.precision, args.cache_dir, args.max_images,
                                   args.workspace_gib)
    except build_trt_engine.EngineBuildUnavailable as exc:
        print(f"vit_engine: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(f"wrote {out} ({'built' if built else f'from the cache in {args.cache_dir}'})")


if __name__ == "__main__":
    main()
