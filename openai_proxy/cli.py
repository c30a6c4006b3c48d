"""The proxy's command line: `python -m openai_proxy` takes all of it, `launcher.serve` the options it passes
through (one definition, so that both list and default them alike)."""

from __future__ import annotations

import argparse
import os

from openai_proxy.address_guard import parse_networks
from openai_proxy.settings import Settings


def add_proxy_arguments(parser: argparse.ArgumentParser, standalone: bool) -> list[argparse.Action]:
    """The proxy's options as a group of ``parser``; `standalone`: also those that `launcher.serve` sets itself
    (Triton's address, the listening socket, the grace period). Returns the options that `proxy_argv` passes on."""
    defaults = Settings()
    group = parser.add_argument_group("OpenAI proxy")
    if standalone:
        group.add_argument("--triton-url", default=defaults.triton_url, help="Triton gRPC host:port")
        group.add_argument("--host", default="127.0.0.1")
        group.add_argument("--port", type=int, default=8000)
        group.add_argument("--fd", type=int, default=None,
                           help="serve on this inherited listening socket instead of binding --host/--port")
        group.add_argument("--shutdown-grace-s", type=float, default=defaults.shutdown_grace_s,
                           help="on SIGTERM/SIGINT, how long requests in flight may still run")
        group.add_argument("--log-level", default="info")
    passed = [
        group.add_argument("--api-key", default=os.environ.get("VLM_API_KEY") or None,
                           help="require `Authorization: Bearer KEY` on /v1 routes (default: $VLM_API_KEY; unset: "
                                "open)"),
        group.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes,
                           help="larger request bodies get 413"),
        group.add_argument("--max-concurrent-requests", type=int, default=defaults.max_concurrent_requests,
                           help="completions in flight (streams included); more get 429"),
        group.add_argument("--request-timeout-s", type=float, default=defaults.request_timeout_s,
                           help="time limit of one request, media fetching and generation included"),
        group.add_argument("--max-media-bytes", type=int, default=defaults.max_media_bytes,
                           help="size limit of one image or video"),
        group.add_argument("--media-timeout-s", type=float, default=defaults.media_timeout_s,
                           help="time limit to download one image or video"),
        group.add_argument("--allow-private-media-urls", action="store_true",
                           help="fetch media from any address, loopback and private networks included"),
        group.add_argument("--allow-media-network", action="append", default=[], metavar="CIDR",
                           help="fetch media from this network even if it is not public (repeatable)"),
        group.add_argument("--niceness", type=int, default=5,
                           help="run at this much lower priority (nice) than the LLM engine: on a host with few "
                                "cores the engine then seldom waits for what only carries its output, while a new "
                                "request's parsing and media downloads still get through quickly"),
    ]
    return passed


def check_proxy_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        parse_networks(args.allow_media_network)
    except ValueError as exc:
        parser.error(f"--allow-media-network: {exc}")


def proxy_argv(args: argparse.Namespace, actions: list[argparse.Action]) -> list[str]:
    """The command-line options of `python -m openai_proxy` that give ``args`` (those not at their default)."""
    argv: list[str] = []
    for action in actions:
        value, flag = getattr(args, action.dest), action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if value else []
        elif isinstance(action, argparse._AppendAction):
            argv += [item for v in value for item in (flag, str(v))]
        elif value != action.default:
            argv += [flag, str(value)]
    return argv


def proxy_settings(args: argparse.Namespace) -> Settings:
    """The settings of a standalone proxy's parsed command line."""
    return Settings(
        triton_url=args.triton_url, api_key=args.api_key,
        max_request_bytes=args.max_request_bytes, max_concurrent_requests=args.max_concurrent_requests,
        request_timeout_s=args.request_timeout_s, shutdown_grace_s=args.shutdown_grace_s,
        max_media_bytes=args.max_media_bytes,
        media_timeout_s=args.media_timeout_s, allow_private_media_urls=args.allow_private_media_urls,
        allowed_media_networks=tuple(args.allow_media_network))
