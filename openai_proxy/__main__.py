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
import signal
import socket

import uvicorn

from openai_proxy.app import create_app
from openai_proxy.cli import add_proxy_arguments, check_proxy_arguments, proxy_settings
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
    parser = argparse.ArgumentParser(prog="python -m openai_proxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_proxy_arguments(parser, standalone=True)
    args = parser.parse_args(argv)
    check_proxy_arguments(parser, args)
    return proxy_settings(args), args


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
