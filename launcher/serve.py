"""Start the whole stack on this machine: tritonserver with our repository plus the OpenAI proxy.

    python -m launcher.serve                       # builds and serves the small test checkpoint
    python -m launcher.serve --checkpoint /models/Qwen2-VL-2B-Instruct
    python -m launcher.serve --api-key SECRET      # options it does not know go to `python -m openai_proxy`
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from export.tiny_model import build_tiny_checkpoint
from launcher.deployment import TRITON_STOP_S, Stack, prepare_cpu_repository
from launcher.triton_server import REPO_ROOT, TritonPorts

DEFAULT_WORKDIR = REPO_ROOT / "build"
STOP_MARGIN_S = 1 + TRITON_STOP_S + 1  # proxy exit, tritonserver exit, killing what is left


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="Qwen2-VL checkpoint directory (default: build the small one)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--port", type=int, default=8000, help="OpenAI proxy port")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--http-port", type=int, default=8010, help="Triton HTTP port")
    parser.add_argument("--served-model-name", default=None, help="default: the checkpoint directory's name")
    parser.add_argument("--shutdown-grace-s", type=float, default=4.0,
                        help="on Ctrl-C/SIGTERM, how long requests in flight may still run; everything has "
                             f"stopped {STOP_MARGIN_S:g} s after it at most")
    # Everything not listed here goes to the proxy, e.g. --api-key, --allow-media-network 10.0.0.0/8.
    args, proxy_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = args.workdir / "tiny-qwen2-vl"
        if not (checkpoint / "config.json").exists():
            build_tiny_checkpoint(checkpoint)
    checkpoint = checkpoint.resolve()
    deploy_dir = args.workdir / "deploy" / checkpoint.name
    repository = prepare_cpu_repository(checkpoint, deploy_dir, served_model_name=args.served_model_name)
    # The proxy drains for the grace period, then gets a second to exit before it is killed; tritonserver
    # gets TRITON_STOP_S after that (Stack.stop): within STOP_MARGIN_S together.
    stack = Stack.create(repository, deploy_dir, TritonPorts(args.http_port, args.grpc_port, args.metrics_port),
                         args.port, [*proxy_args, "--shutdown-grace-s", str(args.shutdown_grace_s)],
                         proxy_stop_s=args.shutdown_grace_s + 1)
    # Explicit handlers: a shell that starts us in the background leaves SIGINT ignored. Set before the
    # start, so that a Ctrl-C during it still stops what has started.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: sys.exit(0))
    try:
        stack.start()
        print(f"Triton gRPC   127.0.0.1:{args.grpc_port}  (metrics http://127.0.0.1:{args.metrics_port}/metrics)")
        print(f"OpenAI API    {stack.proxy.base_url}  model={args.served_model_name or checkpoint.name}")
        print(f"Logs          {deploy_dir}/tritonserver.log, {deploy_dir}/proxy.log   (Ctrl-C stops)", flush=True)
        while stack.running():
            time.sleep(1)
        sys.exit("the proxy exited; see the logs above")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the stop short
            signal.signal(signum, signal.SIG_IGN)
        stack.stop()

if __name__ == "__main__":
    main()
