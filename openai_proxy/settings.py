"""What the proxy is configured with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    triton_url: str = "127.0.0.1:8001"  # Triton gRPC host:port
    served_model_name: str = "qwen2-vl"  # the only `model` accepted and listed
    default_max_tokens: int = 512  # when the request sets neither max_tokens nor max_completion_tokens
    default_video_fps: float = 2.0  # when a video_url part sets no fps
    max_media_bytes: int = 64 * 1024 * 1024  # per image or video, fetched or inline
    media_timeout_s: float = 30.0  # total time to download one media URL
