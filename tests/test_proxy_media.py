"""Media fetching: limits, redirects and the address guard that keeps clients off private networks (SSRF)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from openai_proxy.address_guard import AddressGuard, parse_networks
from openai_proxy.media_fetch import MediaFetcher, MediaFetchError
from openai_proxy.settings import Settings
from tests.proxy_helpers import MODEL, FakeTriton, TrickyMediaServer, assert_openai_error, client_with, image, user

LOOPBACK = AddressGuard(allowed_networks=parse_networks(["127.0.0.1/32"]))


@pytest.fixture(scope="module")
def server():
    with TrickyMediaServer(slow_s=2.0) as running:
        yield running


def fetch(urls: list[str], guard: AddressGuard = LOOPBACK, max_bytes: int = 100, timeout_s: float = 5) -> list[bytes]:
    async def run() -> list[bytes]:
        async with MediaFetcher(max_bytes=max_bytes, timeout_s=timeout_s, guard=guard) as fetcher:
            return await fetcher.fetch_all(urls)

    return asyncio.run(run())


# --- the address guard ---------------------------------------------------------------------------


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
    "224.0.0.1", "239.1.2.3", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "::ffff:127.0.0.1",
    "::ffff:10.0.0.1", "ff02::1",
])
def test_non_public_addresses_are_refused_by_default(address):
    assert not AddressGuard().allows(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2001:4860:4860::8888"])
def test_public_addresses_are_allowed(address):
    assert AddressGuard().allows(ipaddress.ip_address(address))


def test_allow_lists_and_allow_all():
    guard = AddressGuard(allowed_networks=parse_networks(["127.0.0.0/8", "10.1.0.0/16"]))
    allowed = ["127.0.0.1", "127.5.5.5", "::ffff:127.0.0.1", "10.1.200.3", "8.8.8.8"]
    assert all(guard.allows(ipaddress.ip_address(a)) for a in allowed)
    assert not any(guard.allows(ipaddress.ip_address(a)) for a in ["10.2.0.1", "::1", "169.254.169.254"])
    assert AddressGuard(allow_private=True).allows(ipaddress.ip_address("169.254.169.254"))
    with pytest.raises(ValueError):
        parse_networks(["not-a-network"])


# --- fetching ------------------------------------------------------------------------------------


def test_http_fetch_in_order_with_size_limit_and_status_check(server):
    small, large = server.add("small.bin", b"\x00" * 10), server.add("large.bin", b"\x01" * 1000)
    assert fetch([small, "data:,x", small]) == [b"\x00" * 10, b"x", b"\x00" * 10]
    with pytest.raises(MediaFetchError, match="limit"):
        fetch([small, large])
    with pytest.raises(MediaFetchError, match="limit"):
        fetch([server.url("/endless")])  # no Content-Length: counted while it arrives
    with pytest.raises(MediaFetchError, match="HTTP 404"):
        fetch([small.replace("small", "missing")])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "[::ffff:127.0.0.1]", "0.0.0.0"])
def test_loopback_is_refused_without_a_request_leaving(server, host):
    server.add("secret.txt", b"internal")
    before = len(server.seen)
    with pytest.raises(MediaFetchError, match="not a public address"):
        fetch([server.url("/file/secret.txt", host=host)], guard=AddressGuard())
    assert len(server.seen) == before


def test_redirects_are_followed_and_every_hop_is_checked_again(server):
    target = server.add("ok.bin", b"fine")
    assert fetch([server.url(f"/redirect?to={target}")]) == [b"fine"]
    assert fetch([server.url("/redirect?to=/file/ok.bin")]) == [b"fine"], "relative Location"
    # 127.0.0.2 is loopback too, but outside the allowed 127.0.0.1/32.
    for forbidden in (server.url("/file/ok.bin", host="127.0.0.2"), "http://169.254.169.254/latest/meta-data/"):
        with pytest.raises(MediaFetchError, match="not a public address"):
            fetch([server.url(f"/redirect?to={forbidden}")])
    with pytest.raises(MediaFetchError, match="only http"):
        fetch([server.url("/redirect?to=file:///etc/passwd")])
    with pytest.raises(MediaFetchError, match="more than 5 redirects"):
        fetch([server.url("/loop")])


def test_the_connection_goes_to_the_checked_address_under_the_original_host_name(server, monkeypatch):
    """A host name is resolved once per hop; the request keeps its Host header (rebinding-proof)."""
    real_getaddrinfo, lookups = socket.getaddrinfo, []
    answers = iter(["127.0.0.1", "10.0.0.1"])  # a rebinding DNS server: public-looking first, private next

    def fake_getaddrinfo(host, port, *args, **kwargs):
        if host == "media.test":
            lookups.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    server.add("named.bin", b"by name")
    assert fetch([server.url("/file/named.bin", host="media.test")]) == [b"by name"]
    assert lookups == ["media.test"]
    assert server.seen[-1] == ("/file/named.bin", f"media.test:{server.port}")


def test_a_slow_download_hits_the_time_limit(server):
    with pytest.raises(MediaFetchError, match="took longer than 0.5s"):
        fetch([server.url("/slow")], timeout_s=0.5)


def test_unresolvable_hosts_are_a_clear_error():
    with pytest.raises(MediaFetchError, match="cannot resolve"):
        fetch(["http://no-such-host.invalid/a.png"])


# --- the app with default settings ---------------------------------------------------------------


def test_the_default_app_refuses_loopback_media_with_a_400(server):
    """SSRF acceptance: a URL to a loopback-only service is refused by default, and never requested."""
    url = server.add("admin.png", b"secret")
    before = len(server.seen)
    fake = FakeTriton([])
    with client_with(fake, Settings(triton_url="127.0.0.1:1")) as http:
        response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [user([image(url)])]})
    assert_openai_error(response, 400, "not a public address", param="messages")
    assert len(server.seen) == before and not fake.calls
