"""What the proxy is configured with. The served model name and the media per request are the `vlm` model's
settings, which the proxy reads from Triton (client.triton_vlm.TritonVLMClient.settings)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    triton_url: str = "127.0.0.1:8001"  # Triton gRPC host:port
    api_key: str | None = None  # when set, /v1 routes want `Authorization: Bearer <api_key>`
    max_request_bytes: int = 64 * 1024 * 1024  # request body; larger ones get 413
    max_concurrent_requests: int = 256  # generations in flight (streams included); more get 429
    request_timeout_s: float = 600.0  # whole request, media fetching and generation included
    shutdown_grace_s: float = 20.0  # on SIGTERM, how long in-flight requests may still run
    max_media_bytes: int = 64 * 1024 * 1024  # per image or video, fetched or inline
    media_timeout_s: float = 30.0  # total time to download one media URL, redirects included
    # Media URLs that resolve to loopback, private, link-local or other non-public addresses are
    # refused (SSRF) unless allowed here: all of them, or those inside the listed networks (CIDRs).
    allow_private_media_urls: bool = False
    allowed_media_networks: tuple[str, ...] = ()
