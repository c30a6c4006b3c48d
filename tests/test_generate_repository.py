"""The repository generator's output for both targets."""

from __future__ import annotations

import json
import re

import pytest

from export.generate_repository import (
    DEFAULT_CPU_KV_CACHE_BYTES,
    DEFAULT_GPU_MEMORY_UTILIZATION,
    RepositoryOptions,
    build_parser,
    checkpoint_max_model_len,
    default_vit_cpu_threads,
    generate_repository,
)
from export.build_trt_engine import write_profile
from export.repository_options import VIT_SERVER, repository_options
from vlmserve.engine.config import EngineConfig
from vlmserve.media.settings import MediaSettings
from vlmserve.vit.packing import CPU_MAX_PATCHES_PER_CALL
from vlmserve.vlm_settings import VlmSettings


CONTEXT_LENGTH = 32768


@pytest.fixture(autouse=True)
def checkpoint_config(tmp_path):
    """A checkpoint config as transformers writes Qwen2-VL's: the context length in its text_config."""
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "qwen2_vl", "text_config": {"max_position_embeddings": CONTEXT_LENGTH}}))


def fake_plan(checkpoint, max_patches: int = 16384):
    """A stand-in TensorRT plan with its profile record, beside a checkpoint's preprocessor config
    (Qwen2-VL's own limits: images of up to 12845056 pixels, 14-pixel patches)."""
    (checkpoint / "preprocessor_config.json").write_text(
        '{"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2}')
    plan = checkpoint / "vit.plan"
    plan.write_bytes(b"plan")
    write_profile(plan, (16, max_patches, max_patches))
    return plan


def test_gpu_target_pins_one_vit_instance_group_per_gpu(tmp_path):
    engine = fake_plan(tmp_path)
    repo = generate_repository(RepositoryOptions(checkpoint=tmp_path, out=tmp_path / "repo", target="gpu",
                                                 vit_engine=engine, gpus=[0, 1, 2, 3], vit_instances_per_gpu=2))
    vit = (repo / "vit" / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in vit
    groups = re.findall(r"\{ kind: KIND_GPU count: (\d+) gpus: \[ (\d+) \] \}", vit)
    assert groups == [("2", "0"), ("2", "1"), ("2", "2"), ("2", "3")]
    assert (repo / "vit" / "1" / "model.plan").read_bytes() == b"plan"
    # vLLM spans the same GPUs with tensor parallelism and leaves the ViT instances their share.
    config = EngineConfig.read(repo / "vlm" / "1")
    assert config.checkpoint == str(tmp_path.resolve())
    assert config.args["tensor_parallel_size"] == 4
    assert config.args["gpu_memory_utilization"] == DEFAULT_GPU_MEMORY_UTILIZATION < 1
    assert config.args["dtype"] == "bfloat16" and config.args["enable_prefix_caching"] is True
    assert "kv_cache_memory_bytes" not in config.args  # vLLM sizes it from --gpu-memory-utilization
    assert config.args["max_model_len"] == CONTEXT_LENGTH  # the checkpoint's, said explicitly


def test_engine_config_is_passed_through_whole(tmp_path):
    engine = fake_plan(tmp_path)
    opts = RepositoryOptions(checkpoint=tmp_path, out=tmp_path / "repo", target="gpu", vit_engine=engine,
                             gpus=[0, 1, 2, 3, 4, 5, 6, 7], tensor_parallel_size=4, gpu_memory_utilization=0.7,
                             max_model_len=8192, kv_cache_bytes=2**34, enforce_eager=True, quantization="fp8",
                             llm_dtype="bfloat16", enable_prefix_caching=False, llm_engine_args={"swap_space": 8})
    repo = generate_repository(opts)
    args = EngineConfig.read(repo / "vlm" / "1").args
    assert args == {"tensor_parallel_size": 4, "gpu_memory_utilization": 0.7, "max_model_len": 8192,
                    "kv_cache_memory_bytes": 2**34, "enforce_eager": True, "quantization": "fp8",
                    "dtype": "bfloat16", "enable_prefix_caching": False, "swap_space": 8}


def test_cpu_defaults(tmp_path):
    onnx = tmp_path / "vit.onnx"
    onnx.write_bytes(b"onnx")
    config = EngineConfig.read(generate_repository(RepositoryOptions(
        checkpoint=tmp_path, out=tmp_path / "vllm", vit_onnx=onnx)) / "vlm" / "1")
    assert config.args == {"dtype": "float32", "enable_prefix_caching": True, "enforce_eager": False,
                           "tensor_parallel_size": 1, "kv_cache_memory_bytes": DEFAULT_CPU_KV_CACHE_BYTES,
                           "max_model_len": CONTEXT_LENGTH}


def test_the_context_length_is_the_checkpoints_unless_set_and_the_proxy_knows_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"max_position_embeddings": 4096, "text_config": {"max_position_embeddings": 32768, "seq_length": 8192}}))
    assert checkpoint_max_model_len(tmp_path) == 4096  # the least of those given, as vLLM takes it
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="pass --max-model-len"):
        checkpoint_max_model_len(tmp_path)
    onnx = tmp_path / "vit.onnx"
    onnx.write_bytes(b"onnx")
    # Whichever way it is set (a flag, or the engine arguments passed whole), vlm's settings say the same.
    for argv, expected in ((["--max-model-len", "2048"], 2048), (["--llm-engine-args", '{"max_model_len": 1024}'], 1024)):
        args = build_parser().parse_args(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "repo"),
                                          "--vit-onnx", str(onnx), *argv])
        repo = generate_repository(repository_options(args, args.checkpoint, args.out, args.target, args.vit_onnx))
        assert EngineConfig.read(repo / "vlm" / "1").args["max_model_len"] == expected
        assert f'key: "max_model_len" value: {{ string_value: "{expected}" }}' in \
            (repo / "vlm" / "config.pbtxt").read_text()


def test_cpu_target_serves_the_onnx_graph_from_python(tmp_path):
    onnx = tmp_path / "vit.onnx"
    onnx.write_bytes(b"onnx")
    repo = generate_repository(RepositoryOptions(checkpoint=tmp_path, out=tmp_path / "repo", vit_onnx=onnx))
    # One model owns the engine and streams to clients; the others answer once per call.
    assert sorted(p.name for p in repo.iterdir()) == ["preprocess", "vit", "vit_cache", "vlm"]
    for name in ("preprocess", "vit", "vit_cache", "vlm"):
        config = (repo / name / "config.pbtxt").read_text()
        assert 'backend: "python"' in config and (repo / name / "1" / "model.py").exists()
        assert ("decoupled: true" in config) == (name == "vlm")
    assert (repo / "vlm" / "1" / "engine.json").exists()
    assert 'key: "served_model_name" value: { string_value: "' + tmp_path.resolve().name + '" }' in \
        (repo / "vlm" / "config.pbtxt").read_text()
    assert str(onnx.resolve()) in (repo / "vit" / "config.pbtxt").read_text()


def test_a_vit_server_hosts_the_vision_side_and_an_llm_host_that_uses_one_does_not(tmp_path):
    onnx = tmp_path / "vit.onnx"
    onnx.write_bytes(b"onnx")
    server = generate_repository(RepositoryOptions(checkpoint=tmp_path, out=tmp_path / "vit-server", vit_onnx=onnx,
                                                   role=VIT_SERVER, media={"max_pixels": "1003520"}))
    assert sorted(p.name for p in server.iterdir()) == ["encode", "preprocess", "vit"]
    encode = (server / "encode" / "config.pbtxt").read_text()
    assert "decoupled" not in encode and 'key: "max_pixels" value: { string_value: "1003520" }' in encode
    assert (server / "encode" / "1" / "model.py").exists()

    host = generate_repository(RepositoryOptions(checkpoint=tmp_path, out=tmp_path / "llm-host",
                                                 vit_endpoints="vit-0:8001, vit-1:8001"))
    assert sorted(p.name for p in host.iterdir()) == ["vit_cache", "vlm"]
    vlm_config = (host / "vlm" / "config.pbtxt").read_text()
    params = re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', vlm_config)
    assert VlmSettings.from_parameters(dict(params)).vit_endpoints == "vit-0:8001,vit-1:8001"

    both = generate_repository(RepositoryOptions(checkpoint=tmp_path, out=tmp_path / "both", vit_onnx=onnx,
                                                 vit_endpoints="local,vit-0:8001"))
    assert sorted(p.name for p in both.iterdir()) == ["encode", "preprocess", "vit", "vit_cache", "vlm"]
    with pytest.raises(ValueError, match="host:port"):
        generate_repository(RepositoryOptions(checkpoint=tmp_path, out=tmp_path / "bad", vit_endpoints="vit-0"))
    with pytest.raises(ValueError, match="no --vit-endpoints"):
        generate_repository(RepositoryOptions(checkpoint=tmp_path, out=tmp_path / "bad", vit_onnx=onnx,
                                              role=VIT_SERVER, vit_endpoints="vit-0:8001"))


def test_vit_is_batched_by_the_bls_not_by_triton(tmp_path):
    engine = fake_plan(tmp_path)
    repo = generate_repository(RepositoryOptions(checkpoint=tmp_path, out=tmp_path / "repo", target="gpu",
                                                 vit_engine=engine, vit_max_patches=8192))
    vit = (repo / "vit" / "config.pbtxt").read_text()
    assert "max_batch_size: 0" in vit and "dynamic_batching {" not in vit
    assert "# No dynamic_batching" in vit  # the comment says why, for whoever reads the config
    assert 'key: "vit_max_patches" value: { string_value: "8192" }' in (repo / "vlm" / "config.pbtxt").read_text()


def test_cpu_vit_threads_leave_the_llm_its_cores(tmp_path, monkeypatch):
    assert default_vit_cpu_threads(cpu_count=16, vit_instances=1) == 8
    assert default_vit_cpu_threads(cpu_count=16, vit_instances=4) == 2
    assert default_vit_cpu_threads(cpu_count=2, vit_instances=1) == 1
    assert default_vit_cpu_threads(cpu_count=1, vit_instances=4) == 1
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    onnx = tmp_path / "vit.onnx"
    onnx.write_bytes(b"onnx")
    repo = generate_repository(RepositoryOptions(checkpoint=tmp_path, out=tmp_path / "repo", vit_onnx=onnx,
                                                 vit_cpu_instances=2))
    assert 'key: "intra_op_threads" value: { string_value: "8" }' in (repo / "vit" / "config.pbtxt").read_text()


def test_media_settings_and_cache_switch(tmp_path):
    fake_plan(tmp_path)  # for its preprocessor config
    onnx = tmp_path / "vit.onnx"
    onnx.write_bytes(b"onnx")
    opts = RepositoryOptions(checkpoint=tmp_path, out=tmp_path / "repo", vit_onnx=onnx, vit_cache_mb=0.5,
                             media={"max_frames": "64", "video_max_pixels": "200704"})
    repo = generate_repository(opts)
    # vlm keys the cache on the same media settings preprocess applies.
    for name in ("preprocess", "vlm"):
        config = (repo / name / "config.pbtxt").read_text()
        assert 'key: "max_frames" value: { string_value: "64" }' in config
        assert 'key: "video_max_pixels" value: { string_value: "200704" }' in config
    cache = (repo / "vit_cache" / "config.pbtxt").read_text()
    assert "instance_group [ { kind: KIND_CPU count: 1 } ]" in cache
    assert f'key: "max_bytes" value: {{ string_value: "{2**19}" }}' in cache
    assert 'key: "vit_cache" value: { string_value: "true" }' in (repo / "vlm" / "config.pbtxt").read_text()

    # What the generator writes, the models read back typed (vlmserve.model_parameters).
    params = dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}',
                             (repo / "vlm" / "config.pbtxt").read_text()))
    assert VlmSettings.from_parameters(params) == VlmSettings(checkpoint_dir=str(tmp_path.resolve()),
                                                              served_model_name=tmp_path.resolve().name,
                                                              vit_max_patches=CPU_MAX_PATCHES_PER_CALL,
                                                              max_model_len=CONTEXT_LENGTH)
    assert MediaSettings.from_checkpoint(tmp_path).with_parameters(params).max_frames == 64

    off = generate_repository(RepositoryOptions(checkpoint=tmp_path, out=tmp_path / "off", vit_onnx=onnx,
                                                vit_cache_mb=0))
    assert not (off / "vit_cache").exists()
    assert 'key: "vit_cache" value: { string_value: "false" }' in (off / "vlm" / "config.pbtxt").read_text()
    with pytest.raises(ValueError, match="unknown media settings"):
        generate_repository(RepositoryOptions(checkpoint=tmp_path, out=tmp_path / "bad", vit_onnx=onnx,
                                              media={"max_framez": "1"}))


def test_settings_the_tensorrt_profile_cannot_run_are_refused_at_generation(tmp_path):
    def generate(plan, **options):
        return generate_repository(RepositoryOptions(checkpoint=tmp_path, out=tmp_path / "repo", target="gpu",
                                                     vit_engine=plan, **options))

    generate(fake_plan(tmp_path))  # the default budget (4096) and the largest image (16384 patches) fit
    with pytest.raises(ValueError, match=r"vit_max_patches allows vit calls of 8192 patches, but the TensorRT "
                                         r"plan .* was built for at most 4096"):
        generate(fake_plan(tmp_path, max_patches=4096), vit_max_patches=8192, media={"max_pixels": "802816"})
    with pytest.raises(ValueError, match=r"max_pixels allows vit calls of 16384 patches"):
        generate(fake_plan(tmp_path, max_patches=4096))  # the checkpoint's largest image
    generate(fake_plan(tmp_path, max_patches=4096), media={"max_pixels": "802816"})  # 4096 patches: fits
    with pytest.raises(ValueError, match=r"video_max_pixels allows vit calls of 8192 patches"):
        generate(fake_plan(tmp_path, max_patches=4096), media={"max_pixels": "802816", "video_max_pixels": "1605632"})
    plan = fake_plan(tmp_path)
    (tmp_path / "vit.plan.profile.json").unlink()
    with pytest.raises(ValueError, match="no readable profile record"):
        generate(plan)
