"""Turn image/video URLs from a request into bytes: http(s) downloads and inline data: URLs."""

from __future__ import annotations

import asyncio
import base64
import binascii
from urllib.parse import unquote_to_bytes, urlsplit

import httpx


class MediaFetchError(Exception):
    """A media URL could not be turned into bytes; `message` says why (the client's fault: HTTP 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _check_size(data_len: int, max_bytes: int, what: str) -> None:
    if data_len > max_bytes:
        raise MediaFetchError(f"{what} is larger than the {max_bytes} byte limit")


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """Bytes of a `data:[<mediatype>][;base64],<data>` URL (RFC 2397)."""
    header, comma, payload = url.partition(",")
    if not header.lower().startswith("data:") or not comma:
        raise MediaFetchError("malformed data: URL (expected data:<mediatype>;base64,<data>)")
    if header.lower().endswith(";base64"):
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as exc:
            raise MediaFetchError(f"data: URL does not hold valid base64 ({exc})") from None
    else:
        data = unquote_to_bytes(payload)
    _check_size(len(data), max_bytes, "data: URL")
    return data


class MediaFetcher:
    """Fetches media with one shared HTTP connection pool; every URL gets a size and a total-time limit."""

    def __init__(self, max_bytes: int, timeout_s: float) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._http = httpx.AsyncClient(timeout=timeout_s, follow_redirects=True)

    async def __aenter__(self) -> MediaFetcher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.aclose()

    async def fetch(self, url: str) -> bytes:
        scheme = urlsplit(url).scheme.lower()
        if scheme == "data":
            return decode_data_url(url, self.max_bytes)
        if scheme not in ("http", "https"):
            raise MediaFetchError(f"unsupported media URL {url[:64]!r}: only http(s) and data: URLs are accepted")
        try:
            # httpx's timeout bounds each network step; this bounds a slow trickle too.
            async with asyncio.timeout(self.timeout_s):
                return await self._download(url)
        except TimeoutError:
            raise MediaFetchError(f"fetching {url} took longer than {self.timeout_s:g}s") from None
        except httpx.HTTPError as exc:
            raise MediaFetchError(f"could not fetch {url}: {str(exc) or type(exc).__name__}") from None

    async def _download(self, url: str) -> bytes:
        async with self._http.stream("GET", url) as response:
            if response.status_code != 200:
                raise MediaFetchError(f"fetching {url} failed with HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit():
                _check_size(int(declared), self.max_bytes, url)
            data = bytearray()
            async for piece in response.aiter_bytes():
                data += piece
                _check_size(len(data), self.max_bytes, url)
            return bytes(data)

    async def fetch_all(self, urls: list[str]) -> list[bytes]:
        """Fetch concurrently, in order; the first failure cancels the rest."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.fetch(url)) for url in urls]
        except ExceptionGroup as errors:
            raise errors.exceptions[0] from None
        return [task.result() for task in tasks]
