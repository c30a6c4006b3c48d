"""Start the whole stack on this machine: tritonserver with our repository plus the OpenAI proxy.

    python -m vlmserve.serve                       # builds and serves the small test checkpoint
    python -m vlmserve.serve --checkpoint /models/Qwen2-VL-2B-Instruct
    python -m vlmserve.serve --api-key SECRET      # options it does not know go to `python -m openai_proxy`
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from export.tiny_model import build_tiny_checkpoint
from vlmserve.deployment import Stack, prepare_cpu_repository
from vlmserve.triton_server import REPO_ROOT, TritonPorts

DEFAULT_WORKDIR = REPO_ROOT / "build"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="Qwen2-VL checkpoint directory (default: build the small one)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--port", type=int, default=8000, help="OpenAI proxy port")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--http-port", type=int, default=8010, help="Triton HTTP port")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--llm-threads", type=int, default=0,
                        help="torch threads for the LLM (default: torch's; 1 for the small checkpoint)")
    # Everything not listed here goes to the proxy, e.g. --api-key, --allow-media-network 10.0.0.0/8.
    args, proxy_args = parser.parse_known_args(argv)

    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = args.workdir / "tiny-qwen2-vl"
        if not (checkpoint / "config.json").exists():
            build_tiny_checkpoint(checkpoint)
    checkpoint = checkpoint.resolve()
    deploy_dir = args.workdir / "deploy" / checkpoint.name
    llm_threads = args.llm_threads or (1 if args.checkpoint is None else 0)
    repository = prepare_cpu_repository(checkpoint, deploy_dir, llm_threads=llm_threads)
    stack = Stack.create(repository, deploy_dir, args.served_model_name or checkpoint.name,
                         TritonPorts(args.http_port, args.grpc_port, args.metrics_port), args.port, proxy_args)
    stack.start()
    print(f"Triton gRPC   127.0.0.1:{args.grpc_port}  (metrics http://127.0.0.1:{args.metrics_port}/metrics)")
    print(f"OpenAI API    {stack.proxy.base_url}  model={stack.proxy.model_name}")
    print(f"Logs          {deploy_dir}/tritonserver.log, {deploy_dir}/proxy.log   (Ctrl-C stops)", flush=True)
    # Explicit handlers: a shell that starts us in the background leaves SIGINT ignored.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: sys.exit(0))
    try:
        while stack.running():
            time.sleep(1)
        sys.exit("a server process exited; see the logs above")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
