"""`serve`'s command line and preflight: one definition of the settings, checks before any process starts,
and the phases and failures it reports while the stack starts."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from export.generate_repository import build_parser as generate_parser
from export.repository_options import DEFAULTS, VIT_SERVER, RepositoryOptions, repository_options
from launcher.lifecycle import Deployment
from launcher.preflight import (MemoryEstimate, PreflightError, check_checkpoint, check_memory, memory_estimate,
                                weight_counts)
from launcher.processes import free_port, free_ports
from launcher.serve import build_parser as serve_parser
from launcher.startup_log import StartupLog, load_failure
from openai_proxy.cli import add_proxy_arguments, proxy_argv

REPO_ROOT = Path(__file__).resolve().parent.parent


def _defaults(parser: argparse.ArgumentParser) -> dict[str, object]:
    return {action.dest: action.default for action in parser._actions if action.option_strings}


def test_every_setting_has_one_default_on_both_command_lines():
    serve, generate = _defaults(serve_parser()[0]), _defaults(generate_parser())
    shared = serve.keys() & generate.keys()
    # Every repository setting is on both (the GPU target's only where there are GPUs to serve on).
    settings = {field for field in vars(DEFAULTS)} - {"checkpoint", "out", "target", "vit_onnx", "media",
                                                       "enable_prefix_caching"}
    gpu_only = {"vit_engine", "gpus", "vit_instances_per_gpu", "gpu_memory_utilization"}
    assert settings - gpu_only <= shared and gpu_only <= generate.keys() - serve.keys()
    assert {"max_pixels", "max_frames", "video_fps", "no_prefix_caching", "llm_engine_args"} <= shared
    assert {name: serve[name] for name in shared} == {name: generate[name] for name in shared}
    for name in settings - {"gpus"}:
        assert generate[name] == getattr(DEFAULTS, name), name
    # The proxy's options have the defaults of `python -m openai_proxy` too.
    proxy = argparse.ArgumentParser()
    add_proxy_arguments(proxy, standalone=True)
    common = _defaults(proxy).keys() & serve.keys() - {"port", "shutdown_grace_s"}  # serve's own ports and grace
    assert {"api_key", "max_concurrent_requests", "niceness"} <= common
    assert {name: serve[name] for name in common} == {name: _defaults(proxy)[name] for name in common}


def test_serve_passes_each_setting_to_its_owner(tmp_path):
    parser, proxy_actions = serve_parser()
    args = parser.parse_args(["--max-model-len", "2048", "--kv-cache-memory-bytes", "1073741824",
                              "--max-pixels", "200704", "--llm-engine-args", '{"swap_space": 1}', "--api-key", "k",
                              "--allow-media-network", "10.0.0.0/8", "--no-prefix-caching"])
    opts = repository_options(args, tmp_path, tmp_path / "repo")
    assert (opts.max_model_len, opts.kv_cache_bytes, opts.media) == (2048, 2**30, {"max_pixels": "200704"})
    assert opts.llm_engine_args == {"swap_space": 1} and opts.enable_prefix_caching is False
    assert proxy_argv(args, proxy_actions) == ["--api-key", "k", "--allow-media-network", "10.0.0.0/8"]
    assert proxy_argv(parser.parse_args([]), proxy_actions) == []


def _serve(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.serve", *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_an_unknown_option_names_the_closest_known_one():
    result = _serve("--max-model-length", "5")
    assert result.returncode == 2
    assert "unknown option --max-model-length; did you mean --max-model-len?" in result.stderr


def test_help_lists_the_settings_by_group():
    out = _serve("--help").stdout
    for group in ("ports (on 127.0.0.1 unless", "LLM engine", "media limits", "vision tower and preprocessing",
                  "OpenAI proxy"):
        assert f"\n{group}" in out
    for flag in ("--max-model-len", "--kv-cache-bytes", "--max-num-seqs", "--llm-engine-args", "--max-pixels",
                 "--max-frames", "--vit-cache-mb", "--vit-cpu-threads", "--preprocess-instances", "--api-key",
                 "--role", "--vit-endpoints", "--triton-address"):
        assert flag in out


def test_a_taken_port_stops_the_start_within_3s_with_one_line_naming_its_flag(tmp_path):
    grpc_port, = free_ports(1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", grpc_port))
        taken.listen()
        started = time.monotonic()
        result = _serve("--workdir", str(tmp_path), "--grpc-port", str(grpc_port), "--port", str(free_port()))
        took = time.monotonic() - started
    assert result.returncode == 2 and took < 3, (took, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {grpc_port} is taken" in lines[0] and "--grpc-port" in lines[0]
    assert not list(tmp_path.iterdir())  # nothing built, written or started


def test_a_kv_cache_larger_than_the_host_is_refused_before_anything_starts(tiny_checkpoint, tmp_path):
    result = _serve("--checkpoint", str(tiny_checkpoint), "--workdir", str(tmp_path), "--kv-cache-bytes",
                    str(2**50), "--port", str(free_port()))
    assert result.returncode == 2
    assert "lower --kv-cache-bytes" in result.stderr and "KV cache 1048576.0 GiB" in result.stderr
    assert not list(tmp_path.iterdir())


def test_the_memory_check_names_the_largest_setting_to_lower():
    check_memory(MemoryEstimate(weights=2**30, kv_cache=2**30, vit=2**29, processes=2**30), available=2**33)
    with pytest.raises(PreflightError, match=r"need about 4\.5 GiB .* has 4\.0 GiB available: lower "
                                             r"--max-pixels or --vit-cpu-instances"):
        check_memory(MemoryEstimate(weights=2**30, kv_cache=2**29, vit=2**31, processes=2**30), available=2**32)


def test_the_memory_estimate_adds_weights_in_the_engines_dtype_kv_cache_and_vit(tiny_checkpoint, tmp_path):
    counts = weight_counts(tiny_checkpoint)
    assert counts.llm > counts.vision > 0
    opts = RepositoryOptions(checkpoint=tiny_checkpoint, out=tmp_path, kv_cache_bytes=2**30)
    estimate = memory_estimate(opts)
    assert estimate.weights == 4 * (counts.llm + counts.vision) and estimate.kv_cache == 2**30
    half = memory_estimate(RepositoryOptions(checkpoint=tiny_checkpoint, out=tmp_path, llm_dtype="bfloat16",
                                             kv_cache_bytes=2**30, media={"max_pixels": str(28 * 28 * 256)}))
    assert half.weights == estimate.weights // 2 and half.vit < estimate.vit
    # What the engine gets decides, engine arguments passed whole included.
    passed = memory_estimate(RepositoryOptions(checkpoint=tiny_checkpoint, out=tmp_path, llm_engine_args={
        "dtype": "bfloat16", "kv_cache_memory_bytes": 2**29}))
    assert (passed.weights, passed.kv_cache) == (estimate.weights // 2, 2**29)
    # Each host counts what it runs: a ViT server no engine, an LLM host that uses ViT servers no ViT.
    vit_server = memory_estimate(RepositoryOptions(checkpoint=tiny_checkpoint, out=tmp_path, role=VIT_SERVER))
    assert (vit_server.weights, vit_server.kv_cache, vit_server.vit) == (0, 0, estimate.vit)
    llm_host = memory_estimate(RepositoryOptions(checkpoint=tiny_checkpoint, out=tmp_path, kv_cache_bytes=2**30,
                                                 vit_endpoints="vit:8001"))
    assert (llm_host.weights, llm_host.kv_cache, llm_host.vit) == (estimate.weights, 2**30, 0)
    assert vit_server.processes + llm_host.processes > estimate.processes


def test_an_unreadable_checkpoint_is_named(tiny_checkpoint, tmp_path):
    check_checkpoint(tiny_checkpoint)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        (broken / name).write_bytes((tiny_checkpoint / name).read_bytes())
    with pytest.raises(PreflightError, match="no tokenizer"):
        check_checkpoint(broken)
    (broken / "tokenizer.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(PreflightError, match="model.safetensors unreadable"):
        check_checkpoint(broken)
    with pytest.raises(PreflightError, match="not a directory"):
        check_checkpoint(tmp_path / "missing")


LOG = """I1203 23:23:55.966182 3419 model_lifecycle.cc:839] "successfully loaded 'vit'"
(EngineCore pid=3669) INFO 12-03 23:24:44 [default_loader.py:501] Loading weights took 0.36 seconds
(EngineCore pid=3669) ERROR 12-03 23:24:45 [core.py:900] EngineCore failed to start.
(EngineCore pid=3669) Traceback (most recent call last):
(EngineCore pid=3669) ValueError: To serve at least one request with the models's max seq len (32768), (0.50 GiB KV cache is needed, which is larger than the available KV cache memory (0.00 GiB).
E1203 23:24:46.1 3419 model_lifecycle.cc:654] "failed to load 'vlm' version 1: Internal: RuntimeError: Engine core initialization failed. See root cause above."
"""


def test_the_reason_of_a_failed_load_is_the_root_cause_in_the_log(tmp_path):
    failure = load_failure(LOG)
    assert failure.model == "vlm" and failure.reason.startswith("ValueError: To serve at least one request")
    assert load_failure(LOG.replace("(EngineCore pid=3669) ValueError", "(EngineCore pid=3669) Value")).reason \
        == "Internal: RuntimeError: Engine core initialization failed. See root cause above."
    log = tmp_path / "tritonserver.log"
    log.write_text("an earlier start\n" + LOG.splitlines()[-1] + "\n")
    startup = StartupLog(log)  # what this start reads begins here
    assert startup.failure() is None
    with open(log, "a") as f:
        f.write(LOG[:LOG.index("Loading weights")])
    assert startup.new_phases() == ["model vit loaded"]  # the second line is not whole yet
    with open(log, "a") as f:
        f.write(LOG[LOG.index("Loading weights"):])
    assert startup.new_phases() == ["vLLM: weights loaded (0.36 s)"]
    assert startup.failure().model == "vlm"


def test_a_model_that_cannot_load_stops_the_start_with_vllms_reason(tiny_checkpoint, tmp_path):
    http, grpc, metrics, proxy = free_ports(4)
    started = time.monotonic()
    result = _serve("--checkpoint", str(tiny_checkpoint), "--workdir", str(tmp_path), "--enforce-eager",
                    "--kv-cache-bytes", str(2**20), "--port", str(proxy), "--grpc-port", str(grpc),
                    "--metrics-port", str(metrics), "--http-port", str(http), timeout=300)
    print(f"serve failed after {time.monotonic() - started:.1f} s:\n{result.stdout}{result.stderr}")
    assert result.returncode == 1
    phases = result.stdout
    for phase in ("preflight passed", "exporting the vision tower", "model repository written",
                  "starting tritonserver", "model vit loaded", "model preprocess loaded"):
        assert phase in phases
    reason = [line for line in result.stderr.splitlines() if line.startswith("serve: model vlm failed to load: ")]
    assert reason and "KV cache" in reason[0], result.stderr
    assert "OpenAI API" not in phases
    deployment_dir = tmp_path / "deploy" / tiny_checkpoint.name
    assert not Deployment.of(deployment_dir).pids() and not Deployment.of(deployment_dir).regions()
    assert json.loads((deployment_dir / "model_repository" / "vlm" / "1" / "engine.json").read_text())[
        "args"]["kv_cache_memory_bytes"] == 2**20
