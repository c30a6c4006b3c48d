"""Run the OpenAI-compatible proxy:

    python -m openai_proxy --triton-url 127.0.0.1:8001 --host 127.0.0.1 --port 8000

The model name it serves and how many images and videos one request may carry are the `vlm` model's
settings (the repository's), read from Triton.

Media URLs that resolve to loopback, private or link-local addresses are refused unless allowed with
--allow-media-network CIDR (repeatable) or --allow-private-media-urls.

SIGTERM or SIGINT drains (requests in flight get the grace period). SIGUSR1 says the model server lost the
requests in flight (what restarts a dead model process sends it): each gets a 503 at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket

import uvicorn

from openai_proxy.address_guard import parse_networks
from openai_proxy.app import create_app
from openai_proxy.lifetimes import RequestLifetimes
from openai_proxy.settings import Settings
from vlmserve.priority import lower_priority

# uvicorn's own shutdown deadline, past our grace period: then it cancels whatever still runs.
UVICORN_SHUTDOWN_MARGIN_S = 10.0


class DrainingServer(uvicorn.Server):
    """A uvicorn server that, once it stops accepting connections, gives requests in flight a grace period,
    and ends them at once on SIGUSR1."""

    def __init__(self, config: uvicorn.Config, lifetimes: RequestLifetimes) -> None:
        super().__init__(config)
        self.lifetimes = lifetimes

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.lifetimes.lose)

    async def shutdown(self, sockets: list | None = None) -> None:
        self.lifetimes.drain()
        await super().shutdown(sockets)


def parse_settings(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="python -m openai_proxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-url", default=defaults.triton_url, help="Triton gRPC host:port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--fd", type=int, default=None,
                        help="serve on this inherited listening socket instead of binding --host/--port")
    parser.add_argument("--api-key", default=os.environ.get("VLM_API_KEY") or None,
                        help="require `Authorization: Bearer KEY` on /v1 routes (default: $VLM_API_KEY; unset: open)")
    parser.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes,
                        help="larger request bodies get 413")
    parser.add_argument("--max-concurrent-requests", type=int, default=defaults.max_concurrent_requests,
                        help="completions in flight (streams included); more get 429")
    parser.add_argument("--request-timeout-s", type=float, default=defaults.request_timeout_s,
                        help="time limit of one request, media fetching and generation included")
    parser.add_argument("--shutdown-grace-s", type=float, default=defaults.shutdown_grace_s,
                        help="on SIGTERM/SIGINT, how long requests in flight may still run")
    parser.add_argument("--max-media-bytes", type=int, default=defaults.max_media_bytes,
                        help="size limit of one image or video")
    parser.add_argument("--media-timeout-s", type=float, default=defaults.media_timeout_s,
                        help="time limit to download one image or video")
    parser.add_argument("--allow-private-media-urls", action="store_true",
                        help="fetch media from any address, loopback and private networks included")
    parser.add_argument("--allow-media-network", action="append", default=[], metavar="CIDR",
                        help="fetch media from this network even if it is not public (repeatable)")
    parser.add_argument("--niceness", type=int, default=10,
                        help="run at this much lower priority (nice), as the vlm model's own threads do: on a host "
                             "with few cores the LLM engine then never waits for what only carries its output")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        parse_networks(args.allow_media_network)
    except ValueError as exc:
        parser.error(f"--allow-media-network: {exc}")

    settings = Settings(
        triton_url=args.triton_url, api_key=args.api_key,
        max_request_bytes=args.max_request_bytes, max_concurrent_requests=args.max_concurrent_requests,
        request_timeout_s=args.request_timeout_s, shutdown_grace_s=args.shutdown_grace_s,
        max_media_bytes=args.max_media_bytes,
        media_timeout_s=args.media_timeout_s, allow_private_media_urls=args.allow_private_media_urls,
        allowed_media_networks=tuple(args.allow_media_network))
    return settings, args


def main(argv: list[str] | None = None) -> None:
    settings, args = parse_settings(argv)
    lower_priority(args.niceness)  # threads started later inherit it
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=settings.shutdown_grace_s + UVICORN_SHUTDOWN_MARGIN_S)
    # A parent that picked the port hands over its listening socket, so no other process can take the port.
    sockets = None if args.fd is None else [socket.socket(fileno=args.fd)]
    DrainingServer(config, app.state.lifetimes).run(sockets=sockets)


if __name__ == "__main__":
    main()
