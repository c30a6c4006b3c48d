"""Turn image/video URLs from a request into bytes: http(s) downloads and inline data: URLs."""

from __future__ import annotations

import asyncio
import base64
import binascii
from urllib.parse import unquote_to_bytes

import httpx

from openai_proxy.address_guard import AddressGuard, AddressRefused

MAX_REDIRECTS = 5


class MediaFetchError(Exception):
    """A media URL could not be turned into bytes; `message` says why (the client's fault: HTTP 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _check_size(data_len: int, max_bytes: int, what: str) -> None:
    if data_len > max_bytes:
        raise MediaFetchError(f"{what} is larger than the {max_bytes} byte limit")


def _short(url: str | httpx.URL) -> str:
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


def _parse_http_url(url: str, base: httpx.URL | None = None) -> httpx.URL:
    """`url` (resolved against `base`, for redirects) if it is a usable http(s) URL."""
    try:
        parsed = base.join(url) if base is not None else httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise MediaFetchError(f"invalid media URL {_short(url)!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise MediaFetchError(f"unsupported media URL {_short(url)!r}: only http(s) and data: URLs are accepted")
    return parsed


class MediaFetcher:
    """Fetches media under a size limit, a total-time limit and the address guard.

    Redirects are followed here, not by httpx, so that every hop's host is checked again; each
    connection goes to the address that was checked, with the URL's host name kept for the Host
    header and for TLS (SNI and certificate check).
    """

    def __init__(self, max_bytes: int, timeout_s: float, guard: AddressGuard | None = None) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.guard = guard or AddressGuard()
        # No keep-alive: a pooled connection is keyed by address and must not serve another host name.
        # No proxies from the environment: the checked address must be the one connected to.
        self._http = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False,
                                       limits=httpx.Limits(max_keepalive_connections=0))

    async def __aenter__(self) -> MediaFetcher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.aclose()

    async def fetch(self, url: str) -> bytes:
        if url[:5].lower() == "data:":
            return decode_data_url(url, self.max_bytes)
        target = _parse_http_url(url)
        try:
            # httpx's timeout bounds each network step; this bounds DNS, redirects and a slow trickle too.
            async with asyncio.timeout(self.timeout_s):
                return await self._download(target)
        except TimeoutError:
            raise MediaFetchError(f"fetching {_short(url)} took longer than {self.timeout_s:g}s") from None
        except AddressRefused as exc:
            raise MediaFetchError(f"refusing to fetch {_short(url)}: {exc}") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise MediaFetchError(f"could not fetch {_short(url)}: {str(exc) or type(exc).__name__}") from None

    async def _download(self, url: httpx.URL) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            host = url.raw_host.decode("ascii")
            address = await self.guard.resolve(host, url.port or (443 if url.scheme == "https" else 80))
            pinned = url.copy_with(host=str(address))
            # Media formats are compressed already; identity also keeps gzip bombs out.
            headers = {"Host": url.netloc.decode("ascii"), "Accept-Encoding": "identity"}
            async with self._http.stream("GET", pinned, headers=headers,
                                         extensions={"sni_hostname": host}) as response:
                if response.is_redirect:
                    url = _parse_http_url(response.headers["location"], base=url)
                    continue
                if response.status_code != 200:
                    raise MediaFetchError(f"fetching {_short(url)} failed with HTTP {response.status_code}")
                return await self._read(response, url)
        raise MediaFetchError(f"fetching {_short(url)}: more than {MAX_REDIRECTS} redirects")

    async def _read(self, response: httpx.Response, url: httpx.URL) -> bytes:
        declared = response.headers.get("content-length")
        if declared and declared.isdigit():
            _check_size(int(declared), self.max_bytes, _short(url))
        data = bytearray()
        async for piece in response.aiter_raw():  # undecoded: a Content-Encoding we did not ask for is not undone
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
