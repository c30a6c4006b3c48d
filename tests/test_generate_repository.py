"""The repository generator's output for both targets."""

from __future__ import annotations

import re

from export.generate_repository import RepositoryOptions, generate_repository


def test_gpu_target_pins_one_vit_instance_group_per_gpu(tmp_path):
    engine = tmp_path / "vit.plan"
    engine.write_bytes(b"plan")
    repo = generate_repository(RepositoryOptions(checkpoint=tmp_path, out=tmp_path / "repo", target="gpu",
                                                 vit_engine=engine, gpus=[0, 1, 2, 3], vit_instances_per_gpu=2))
    vit = (repo / "vit" / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in vit
    groups = re.findall(r"\{ kind: KIND_GPU count: (\d+) gpus: \[ (\d+) \] \}", vit)
    assert groups == [("2", "0"), ("2", "1"), ("2", "2"), ("2", "3")]
    assert (repo / "vit" / "1" / "model.plan").read_bytes() == b"plan"
    assert 'string_value: "cuda"' in (repo / "llm" / "config.pbtxt").read_text()


def test_cpu_target_serves_the_onnx_graph_from_python(tmp_path):
    onnx = tmp_path / "vit.onnx"
    onnx.write_bytes(b"onnx")
    repo = generate_repository(RepositoryOptions(checkpoint=tmp_path, out=tmp_path / "repo", vit_onnx=onnx))
    assert sorted(p.name for p in repo.iterdir()) == ["llm", "preprocess", "vit", "vlm"]
    for name in ("preprocess", "vit", "llm", "vlm"):
        config = (repo / name / "config.pbtxt").read_text()
        assert 'backend: "python"' in config and (repo / name / "1" / "model.py").exists()
    assert "decoupled: true" in (repo / "llm" / "config.pbtxt").read_text()
    assert "decoupled: true" in (repo / "vlm" / "config.pbtxt").read_text()
    assert str(onnx.resolve()) in (repo / "vit" / "config.pbtxt").read_text()
