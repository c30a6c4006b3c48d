"""Turn image/video URLs from a request into bytes: http(s) downloads and inline data: URLs."""

from __future__ import annotations

import asyncio
import base64
import binascii
import socket
from urllib.parse import unquote_to_bytes

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.helpers import is_ip_address
from yarl import URL

from openai_proxy.address_guard import AddressGuard, AddressRefused

MAX_REDIRECTS = 5
REDIRECT_STATUSES = (301, 302, 303, 307, 308)


class MediaFetchError(Exception):
    """A media URL could not be turned into bytes; `message` says why (the client's fault: HTTP 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _check_size(data_len: int, max_bytes: int, what: str) -> None:
    if data_len > max_bytes:
        raise MediaFetchError(f"{what} is larger than the {max_bytes} byte limit")


def _short(url: str | URL) -> str:
    url = str(url)
    return url if len(url) <= 100 else url[:97] + "..."


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """Bytes of a `data:[<mediatype>][;base64],<data>` URL (RFC 2397)."""
    header, comma, payload = url.partition(",")
    if not header.lower().startswith("data:") or not comma:
        raise MediaFetchError("malformed data: URL (expected data:<mediatype>;base64,<data>)")
    # Base64 holds 3 bytes per 4 characters: refuse an oversized payload before decoding it.
    _check_size(len(payload) // 4 * 3, max_bytes, "data: URL")
    if header.lower().endswith(";base64"):
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as exc:
            raise MediaFetchError(f"data: URL does not hold valid base64 ({exc})") from None
    else:
        data = unquote_to_bytes(payload)
    _check_size(len(data), max_bytes, "data: URL")
    return data


def _parse_http_url(url: str, base: URL | None = None) -> URL:
    """`url` (resolved against `base`, for redirects) if it is a usable http(s) URL."""
    try:
        parsed = base.join(URL(url)) if base is not None else URL(url)
    except ValueError as exc:
        raise MediaFetchError(f"invalid media URL {_short(url)!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise MediaFetchError(f"unsupported media URL {_short(url)!r}: only http(s) and data: URLs are accepted")
    return parsed


class _GuardedResolver(AbstractResolver):
    """aiohttp's host name lookups, each answer checked by the guard: the connection goes to that address."""

    def __init__(self, guard: AddressGuard) -> None:
        self.guard = guard

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[dict]:
        address = await self.guard.resolve(host, port)
        return [{"hostname": host, "host": str(address), "port": port, "proto": 0, "flags": socket.AI_NUMERICHOST,
                 "family": socket.AF_INET6 if address.version == 6 else socket.AF_INET}]

    async def close(self) -> None:
        pass


class MediaFetcher:
    """Fetches media under a size limit, a total-time limit and the address guard.

    Host names are resolved by the guard (aiohttp connects to the address it checked, keeping the name
    for the Host header and for TLS); addresses written in the URL are checked before aiohttp sees them.
    Redirects are followed here, so that every hop is checked again. Pooled connections are keyed by
    host name, so one is only reused for the name it was checked for. aiohttp rather than httpx: a
    fetch costs a third of the CPU, and every image of every request passes here.
    """

    def __init__(self, max_bytes: int, timeout_s: float, guard: AddressGuard | None = None) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.guard = guard or AddressGuard()
        # No connection limit of its own: the proxy's concurrency limit and the media per request bound it.
        # No proxies from the environment (trust_env): the checked address must be the one connected to.
        # Media formats are compressed already: bodies stay as sent (identity also keeps gzip bombs out).
        connector = aiohttp.TCPConnector(resolver=_GuardedResolver(self.guard), use_dns_cache=False, limit=0)
        self._http = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s),
                                           auto_decompress=False, trust_env=False)

    async def __aenter__(self) -> MediaFetcher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.close()

    async def fetch(self, url: str) -> bytes:
        if url[:5].lower() == "data:":
            return decode_data_url(url, self.max_bytes)
        target = _parse_http_url(url)
        try:
            # aiohttp's timeout bounds each request; this bounds DNS, redirects and a slow trickle too.
            async with asyncio.timeout(self.timeout_s):
                return await self._download(target)
        except TimeoutError:
            raise MediaFetchError(f"fetching {_short(url)} took longer than {self.timeout_s:g}s") from None
        except AddressRefused as exc:
            raise MediaFetchError(f"refusing to fetch {_short(url)}: {exc}") from None
        except aiohttp.ClientError as exc:
            raise MediaFetchError(f"could not fetch {_short(url)}: {str(exc) or type(exc).__name__}") from None

    async def _check_literal_address(self, url: URL) -> None:
        """An address written in the URL (legacy numeric forms such as 2130706433 included), which aiohttp
        connects to without asking the resolver: checked here."""
        if is_ip_address(url.raw_host or ""):
            await self.guard.resolve(url.raw_host, url.port or 0)

    async def _download(self, url: URL) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            await self._check_literal_address(url)
            async with self._http.get(url, allow_redirects=False, headers={"Accept-Encoding": "identity"}) as response:
                if response.status in REDIRECT_STATUSES and "Location" in response.headers:
                    url = _parse_http_url(response.headers["Location"], base=url)
                    continue
                if response.status != 200:
                    raise MediaFetchError(f"fetching {_short(url)} failed with HTTP {response.status}")
                return await self._read(response, url)
        raise MediaFetchError(f"fetching {_short(url)}: more than {MAX_REDIRECTS} redirects")

    async def _read(self, response: aiohttp.ClientResponse, url: URL) -> bytes:
        if response.content_length is not None:
            _check_size(response.content_length, self.max_bytes, _short(url))
        data = bytearray()
        async for piece in response.content.iter_any():
            data += piece
            _check_size(len(data), self.max_bytes, _short(url))
        return bytes(data)

    async def fetch_all(self, urls: list[str]) -> list[bytes]:
        """Fetch concurrently, in order; the first failure cancels the rest."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.fetch(url)) for url in urls]
        except ExceptionGroup as errors:
            raise errors.exceptions[0] from None
        return [task.result() for task in tasks]
