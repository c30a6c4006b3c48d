"""TensorRT engine cache keys, the cache itself and build progress, without TensorRT (GPU test skipped here)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from export import build_trt_engine
from export.engine_cache import KEY_NAME, EngineCache, EngineKey, vision_fingerprint
from export.trt_progress import PhaseLog, progress_monitor

REPO_ROOT = Path(__file__).resolve().parents[1]
KEY = EngineKey("0" * 64, "fp16", (16, 16384, 16384), "10.5.0", "NVIDIA H100 sm_90")


def _copy_with(checkpoint: Path, out: Path, change) -> Path:
    shutil.copytree(checkpoint, out)
    weights = next(out.glob("*.safetensors"))
    tensors = load_file(weights)
    change(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    return out


def test_fingerprint_follows_the_vision_tower_only(tiny_checkpoint, tmp_path):
    base = vision_fingerprint(tiny_checkpoint)
    assert base == vision_fingerprint(tiny_checkpoint) and len(base) == 64
    names = load_file(next(tiny_checkpoint.glob("*.safetensors"))).keys()
    vision = next(n for n in names if n.startswith(("visual.", "model.visual.")))
    text = next(n for n in names if "visual" not in n)

    def bump(name):
        def change(tensors):
            tensors[name] = tensors[name] + 1
        return change

    assert vision_fingerprint(_copy_with(tiny_checkpoint, tmp_path / "vision", bump(vision))) != base
    assert vision_fingerprint(_copy_with(tiny_checkpoint, tmp_path / "text", bump(text))) == base

    def rename(tensors):  # re-saved checkpoints may spell the prefix "model.visual."
        for name in [n for n in tensors if n.startswith("visual.")]:
            tensors["model." + name] = tensors.pop(name)

    assert vision_fingerprint(_copy_with(tiny_checkpoint, tmp_path / "renamed", rename)) != base

    def drop_vision(tensors):
        for name in [n for n in tensors if "visual" in n]:
            del tensors[name]

    with pytest.raises(FileNotFoundError, match="no vision tower weights"):
        vision_fingerprint(_copy_with(tiny_checkpoint, tmp_path / "text-only", drop_vision))


def test_every_key_field_changes_the_digest():
    variants = [KEY.__class__(**{**KEY.__dict__, field: value}) for field, value in [
        ("checkpoint", "1" * 64), ("precision", "bf16"), ("profile", (16, 8192, 16384)), ("tensorrt", "10.6.0"),
        ("gpu", "NVIDIA L4 sm_89")]]
    assert len({KEY.digest(), *(v.digest() for v in variants)}) == 6


def test_cache_builds_once_and_reuses(tmp_path):
    cache = EngineCache(tmp_path / "cache")
    builds = []

    def build(plan: Path) -> None:
        builds.append(plan)
        plan.write_bytes(b"engine")

    plan, built = cache.get_or_build(KEY, build)
    assert built and plan.read_bytes() == b"engine" and plan.parent == cache.entry(KEY)
    assert json.loads((plan.parent / KEY_NAME).read_text())["profile"] == [16, 16384, 16384]
    again, built = cache.get_or_build(KEY, build)
    assert again == plan and not built and len(builds) == 1
    other = EngineKey(KEY.checkpoint, "bf16", KEY.profile, KEY.tensorrt, KEY.gpu)
    assert cache.lookup(other) is None
    assert cache.get_or_build(other, build)[1] and len(builds) == 2


def test_a_foreign_or_broken_entry_is_rebuilt(tmp_path):
    cache = EngineCache(tmp_path)
    entry = cache.entry(KEY)
    entry.mkdir()
    (entry / KEY_NAME).write_text(json.dumps({**KEY.as_json(), "tensorrt": "9.0"}))
    assert cache.lookup(KEY) is None
    plan, built = cache.get_or_build(KEY, lambda path: path.write_bytes(b"new"))
    assert built and plan.read_bytes() == b"new" and cache.lookup(KEY) == plan


def test_a_failed_build_leaves_no_entry(tmp_path):
    def fail(plan: Path) -> None:
        plan.write_bytes(b"half")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        EngineCache(tmp_path).get_or_build(KEY, fail)
    assert list(tmp_path.iterdir()) == []


def test_progress_monitor_prints_nested_phases():
    class FakeMonitorBase:
        def __init__(self):
            self.initialised = True

    out = io.StringIO()
    monitor = progress_monitor(types.SimpleNamespace(IProgressMonitor=FakeMonitorBase), stream=out)
    assert monitor.initialised
    monitor.phase_start("Building engine", None, 3)
    monitor.phase_start("Tactic selection", "Building engine", 100)
    assert all(monitor.step_complete("Tactic selection", step) for step in range(100))
    monitor.phase_finish("Tactic selection")
    monitor.phase_finish("Building engine")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[trt] Building engine (3 steps)"
    assert lines[1] == "[trt]   Tactic selection (100 steps)"
    assert lines[2:] == [f"[trt]     Tactic selection: {n}/100" for n in range(10, 101, 10)]


def test_without_iprogressmonitor_the_phase_log_remains():
    assert progress_monitor(types.SimpleNamespace()) is None
    out = io.StringIO()
    with PhaseLog(out).phase("building"):
        pass
    assert out.getvalue().startswith("[trt] building ...\n[trt] building: done in ")


def _tensorrt_and_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    return build_trt_engine.cuda_device_count() > 0


def test_cached_engine_without_tensorrt_or_gpu_exits_2(tiny_checkpoint, tmp_path):
    if _tensorrt_and_gpu():
        pytest.skip("tensorrt and a CUDA GPU are present: test_cached_engine_on_gpu covers the build")
    result = subprocess.run(
        [sys.executable, "-m", "export.vit_engine", str(tiny_checkpoint), str(tmp_path / "vit.plan"),
         "--cache-dir", str(tmp_path / "cache")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "tensorrt is not importable" in result.stderr or "no CUDA GPU" in result.stderr
    assert not (tmp_path / "vit.plan").exists()


@pytest.mark.skipif(not _tensorrt_and_gpu(), reason="needs the tensorrt package and a CUDA GPU")
def test_cached_engine_on_gpu(tiny_checkpoint, tmp_path, capfd):
    from export.vit_engine import cached_engine

    plan, built = cached_engine(tiny_checkpoint, tmp_path / "a.plan", "fp16", tmp_path / "cache")
    assert built and plan.stat().st_size > 0
    assert "[trt] building the fp16 engine" in capfd.readouterr().err
    again, built = cached_engine(tiny_checkpoint, tmp_path / "b.plan", "fp16", tmp_path / "cache")
    assert not built and again.read_bytes() == plan.read_bytes()  # running engines: test_vision_onnx.py
