"""Start the whole stack on this machine: tritonserver with our repository plus the OpenAI proxy.

    python -m launcher.serve                       # builds and serves the small test checkpoint
    python -m launcher.serve --checkpoint /models/Qwen2-VL-2B-Instruct --max-model-len 8192
    python -m launcher.serve --api-key SECRET --kv-cache-bytes 4294967296 --max-pixels 1003520
    python -m launcher.serve --role vit-server --grpc-port 9001 ...   # a ViT server (tritonserver only, no proxy)
    python -m launcher.serve --vit-endpoints vithost1:9001,vithost2:9001   # an LLM host that uses them

Before any process starts, it checks that every port is free, that the checkpoint is readable and that the
host has the memory the settings need (exit code 2 and one line naming the setting otherwise). Then it says
each phase of the start as it happens.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import signal
import sys
import time
from pathlib import Path

from export.repository_options import VIT_SERVER, RepositoryOptions, add_repository_arguments, repository_options
from launcher.preflight import (PreflightError, available_memory, check_checkpoint, check_memory, check_ports,
                                memory_estimate)
from launcher.processes import TRITON_STOP_S
from launcher.progress import Progress
from openai_proxy.cli import add_proxy_arguments, check_proxy_arguments, proxy_argv

DEFAULT_WORKDIR = Path(__file__).resolve().parent.parent / "build"
STOP_MARGIN_S = 1 + TRITON_STOP_S + 1  # proxy exit, tritonserver exit, killing what is left
PREFLIGHT_FAILED = 2  # the exit code of a start refused before any process started


class ServeParser(argparse.ArgumentParser):
    """Unknown options are an error that names the closest known one."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            known = [flag for action in self._actions for flag in action.option_strings]
            option = next((u.split("=")[0] for u in unknown if u.startswith("-")), unknown[0])
            close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
            self.error(f"unknown option {option}" + (f"; did you mean {close[0]}?" if close else ""))
        return parsed


def build_parser() -> tuple[ServeParser, list[argparse.Action]]:
    """The parser, and the proxy's options it passes on."""
    parser = ServeParser(prog="serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                         allow_abbrev=False)
    parser.add_argument("--checkpoint", type=Path, help="Qwen2-VL checkpoint directory (default: build the small one)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where the repository and logs go")
    parser.add_argument("--shutdown-grace-s", type=float, default=4.0,
                        help="on Ctrl-C/SIGTERM, how long requests in flight may still run; everything has "
                             f"stopped {STOP_MARGIN_S:g} s after it at most")
    parser.add_argument("--load-timeout-s", type=float, default=1800.0,
                        help="how long tritonserver may take to load every model (a large checkpoint on CPU takes "
                             "minutes), and one model to load again after its process died")
    ports = parser.add_argument_group("ports (on 127.0.0.1 unless --triton-address says otherwise)")
    ports.add_argument("--triton-address", default="127.0.0.1",
                       help="the interface Triton's ports listen on (0.0.0.0: all, for a ViT server that LLM hosts on "
                            "other machines reach)")
    ports.add_argument("--port", type=int, default=8000, help="OpenAI proxy port")
    ports.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port")
    ports.add_argument("--metrics-port", type=int, default=8002, help="Triton metrics port")
    ports.add_argument("--http-port", type=int, default=8010, help="Triton HTTP port")
    add_repository_arguments(parser, gpu=False)
    return parser, add_proxy_arguments(parser, standalone=False)


def refuse(error: PreflightError) -> None:
    print(f"serve: {error}", file=sys.stderr, flush=True)
    sys.exit(PREFLIGHT_FAILED)


def main(argv: list[str] | None = None) -> None:
    progress = Progress()
    parser, proxy_actions = build_parser()
    args = parser.parse_args(argv)
    check_proxy_arguments(parser, args)
    vit_server = args.role == VIT_SERVER
    ports = {"--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port, "--http-port": args.http_port}
    try:
        check_ports(ports if vit_server else {"--port": args.port, **ports})
    except PreflightError as exc:
        refuse(exc)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per health check among the phases

    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = args.workdir / "tiny-qwen2-vl"
        if not (checkpoint / "config.json").exists():
            from export.tiny_model import build_tiny_checkpoint
            progress(f"building the small test checkpoint in {checkpoint}")
            build_tiny_checkpoint(checkpoint)
    checkpoint = checkpoint.resolve()
    deploy_dir = args.workdir / "deploy" / checkpoint.name
    opts = repository_options(args, checkpoint, deploy_dir / "model_repository", vit_onnx=deploy_dir / "vit.onnx")
    try:
        check_checkpoint(checkpoint)
        estimate, available = memory_estimate(opts), available_memory()
        check_memory(estimate, available)
    except PreflightError as exc:
        refuse(exc)
    progress(f"preflight passed: ports free, checkpoint readable, about {estimate.total / 2**30:.1f} GiB of "
             f"memory needed, {available / 2**30:.1f} GiB available")
    run(args, opts, proxy_argv(args, proxy_actions), progress)


def run(args: argparse.Namespace, opts: RepositoryOptions, proxy_args: list[str], progress: Progress) -> None:
    """Write the repository, start the stack and serve until Ctrl-C."""
    from launcher.deployment import Stack, write_cpu_repository
    from launcher.triton_server import ServerExited, TritonPorts

    deploy_dir = opts.out.parent
    repository = write_cpu_repository(opts, progress)
    # The proxy drains for the grace period, then gets a second to exit before it is killed; tritonserver
    # gets TRITON_STOP_S after that (Stack.stop): within STOP_MARGIN_S together.
    vit_server = opts.role == VIT_SERVER
    stack = Stack.create(repository, deploy_dir, TritonPorts(args.http_port, args.grpc_port, args.metrics_port),
                         None if vit_server else args.port,
                         [*proxy_args, "--shutdown-grace-s", str(args.shutdown_grace_s)],
                         proxy_stop_s=args.shutdown_grace_s + 1, load_timeout_s=args.load_timeout_s,
                         triton_address=args.triton_address)
    # Explicit handlers: a shell that starts us in the background leaves SIGINT ignored. Set before the
    # start, so that a Ctrl-C during it still stops what has started.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: sys.exit(0))
    try:
        try:
            stack.start(progress)
        except ServerExited as exited:
            if exited.failure is None:
                raise
            sys.exit(f"serve: model {exited.failure.model} failed to load: {exited.failure.reason}\n"
                     f"serve: the whole log is {deploy_dir}/tritonserver.log")
        print(f"Triton gRPC   {args.triton_address}:{args.grpc_port}  (metrics {stack.triton.metrics_url})")
        if stack.proxy is None:
            print(f"ViT server    LLM hosts reach it with --vit-endpoints HOST:{args.grpc_port}")
            print(f"Logs          {deploy_dir}/tritonserver.log   (Ctrl-C stops)")
        else:
            print(f"OpenAI API    {stack.proxy.base_url}  model={args.served_model_name or opts.checkpoint.name}")
            print(f"Logs          {deploy_dir}/tritonserver.log, {deploy_dir}/proxy.log   (Ctrl-C stops)")
        print(f"Started in {progress.elapsed():.1f} s", flush=True)
        while stack.running():
            time.sleep(1)
        sys.exit("the proxy or tritonserver exited for good; see the logs above")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the stop short
            signal.signal(signum, signal.SIG_IGN)
        stack.stop()


if __name__ == "__main__":
    main()
