"""Run the OpenAI-compatible proxy:

    python -m openai_proxy --triton-url 127.0.0.1:8001 --host 127.0.0.1 --port 8000 --served-model-name qwen2-vl
"""

from __future__ import annotations

import argparse
import logging

import uvicorn

from openai_proxy.app import create_app
from openai_proxy.settings import Settings


def main(argv: list[str] | None = None) -> None:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="python -m openai_proxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-url", default=defaults.triton_url, help="Triton gRPC host:port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=defaults.served_model_name,
                        help="the model name clients send and /v1/models lists")
    parser.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens)
    parser.add_argument("--default-video-fps", type=float, default=defaults.default_video_fps)
    parser.add_argument("--max-media-bytes", type=int, default=defaults.max_media_bytes,
                        help="size limit of one image or video")
    parser.add_argument("--media-timeout-s", type=float, default=defaults.media_timeout_s,
                        help="time limit to download one image or video")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    settings = Settings(triton_url=args.triton_url, served_model_name=args.served_model_name,
                        default_max_tokens=args.default_max_tokens, default_video_fps=args.default_video_fps,
                        max_media_bytes=args.max_media_bytes, media_timeout_s=args.media_timeout_s)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
