"""A local HTTP server for media, so servers fetch images and videos by URL as real clients make them do."""

from __future__ import annotations

import functools
import http.server
import sys
import threading
from pathlib import Path
from urllib.parse import quote


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A server under test may hang up before the whole file is sent (seen from the benchmarked servers
        # under load, with every request answered): its business, not a failure to print a traceback for.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class MediaServer:
    """Serves `root` on 127.0.0.1 (a free port) from a daemon thread while the context is open."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        handler = functools.partial(_QuietHandler, directory=str(self.root))
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, relative_path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_port}/{quote(relative_path)}"

    def add(self, name: str, data: bytes) -> str:
        """Write `data` as `name` under the root; its URL."""
        (self.root / name).write_bytes(data)
        return self.url(name)

    def __enter__(self) -> MediaServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
