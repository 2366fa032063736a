"""SSRF guard for URLs that come from requests: v2 image URLs and per-request webhook URLs.

A URL is allowed only when it is http(s) and every address its host resolves to is public. One bad
address is enough to refuse: the HTTP client may connect to any of them. `fetch` also connects to the
very address it checked (a second DNS answer could point elsewhere: DNS rebinding) and checks every
redirect hop again. An operator who wants LAN or loopback URLs passes `allow_private=True`.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from typing import AsyncIterator, Union

import httpx

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

MAX_REDIRECTS = 5
# Some image hosts answer scripts with 403; Fooocus-API sends a browser User-Agent too.
USER_AGENT = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/124.0.0.0 Safari/537.36")

_SCHEMES = {"http": 80, "https": 443}
_METADATA_HOSTS = {"metadata.google.internal", "metadata"}
_METADATA_ADDRESSES = {ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")}
_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT; not in is_private
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # a NAT64 gateway forwards these to the embedded IPv4
# Most specific first, so that the message names the reason a reader would expect.
_REASONS = (
    ("is_loopback", "loopback"),
    ("is_unspecified", "unspecified"),
    ("is_link_local", "link-local"),
    ("is_multicast", "multicast"),
    ("is_reserved", "reserved"),
    ("is_private", "private"),
)


class UnsafeURL(ValueError):
    """The URL may not be fetched: wrong scheme, no host, or a host that is not public."""


class FetchError(ValueError):
    """Fetching failed; `status` is the HTTP status to answer the client with (413 or 422)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def check_url(url: str, allow_private: bool = False) -> None:
    """Raise UnsafeURL unless `url` is http(s) and all addresses of its host are public."""
    _, host, port = _parse(url)
    if not allow_private:
        _refuse_metadata_host(host)
    _check_addresses(host, _resolve(host, port), allow_private)


async def check_url_async(url: str, allow_private: bool = False) -> None:
    """`check_url` without blocking the event loop on DNS."""
    await _checked_addresses(url, allow_private)


async def fetch(url: str, *, allow_private: bool, max_bytes: int, timeout_s: float = 20.0) -> bytes:
    """GET `url` (checked, redirects followed and re-checked by hand) and return at most `max_bytes`.

    Raises UnsafeURL for a refused hop and FetchError for everything else that goes wrong. The
    timeout covers the whole fetch: httpx's own timeouts are per read, so a server that drips one
    byte a second would otherwise hold the request forever."""
    try:
        return await asyncio.wait_for(_fetch(url, allow_private, max_bytes, timeout_s), timeout_s)
    except asyncio.TimeoutError:
        raise FetchError(f"fetching the URL took longer than {timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise FetchError(f"could not fetch the URL: {type(exc).__name__}: {exc}") from None
    except httpx.InvalidURL as exc:  # a redirect's Location that does not parse
        raise FetchError(f"the URL redirected to an invalid URL: {exc}") from None


# -- checking -------------------------------------------------------------------------------------

def _parse(url: str) -> tuple[httpx.URL, str, int]:
    """Parse with httpx, the client that will fetch it, so that checker and fetcher agree on the host."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise UnsafeURL(f"not a valid URL: {exc}") from None
    if parsed.scheme not in _SCHEMES:
        raise UnsafeURL(f"only http and https URLs are allowed, not {parsed.scheme or 'no scheme'!r}")
    host = parsed.raw_host.decode("ascii").rstrip(".").lower()
    if not host:
        raise UnsafeURL("the URL has no host")
    return parsed, host, parsed.port or _SCHEMES[parsed.scheme]


def _refuse_metadata_host(host: str) -> None:
    # Named before resolving: off the cloud these names do not resolve and would fail less clearly.
    if host in _METADATA_HOSTS:
        raise UnsafeURL(f"{host} is a cloud metadata host; only public addresses are allowed")


async def _checked_addresses(url: str, allow_private: bool) -> tuple[httpx.URL, list[IPAddress]]:
    parsed, host, port = _parse(url)
    if not allow_private:
        _refuse_metadata_host(host)
    addresses = await _resolve_async(host, port)
    _check_addresses(host, addresses, allow_private)
    return parsed, addresses


def _check_addresses(host: str, addresses: list[IPAddress], allow_private: bool) -> None:
    if allow_private:
        return
    for address in addresses:
        reason = _refusal(address)
        if reason:
            where = host if _literal(host) else f"{host} resolves to {address}, which"
            article = "an" if reason[0] in "aeiou" else "a"
            raise UnsafeURL(f"{where} is {article} {reason} address; only public addresses are allowed")


def _refusal(address: IPAddress) -> str | None:
    """Why `address` is not public, or None when it is."""
    address = _embedded_ipv4(address)
    if address in _METADATA_ADDRESSES:
        return "cloud metadata"
    if address.version == 4 and address in _SHARED_ADDRESS_SPACE:
        return "shared (carrier-grade NAT)"
    for attribute, reason in _REASONS:
        if getattr(address, attribute):
            return reason
    # Whatever else the registries set aside (documentation, benchmarking, ...).
    return None if address.is_global else "non-public"


def _embedded_ipv4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one stands for: ::ffff:127.0.0.1 reaches 127.0.0.1 on a dual-stack socket."""
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


# -- resolving ------------------------------------------------------------------------------------

def _literal(host: str) -> list[IPAddress] | None:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        return None


def _resolve(host: str, port: int) -> list[IPAddress]:
    literal = _literal(host)
    if literal:
        return literal
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise UnsafeURL(f"cannot resolve host {host}: {exc}") from None
    return _addresses(infos)


async def _resolve_async(host: str, port: int) -> list[IPAddress]:
    literal = _literal(host)
    if literal:
        return literal
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise UnsafeURL(f"cannot resolve host {host}: {exc}") from None
    return _addresses(infos)


def _addresses(infos: list) -> list[IPAddress]:
    # sockaddr[0] may carry an IPv6 zone ("fe80::1%eth0"); the zone does not change the verdict.
    found = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not found:
        raise UnsafeURL("the host resolves to no address")
    return list(dict.fromkeys(found))


# -- fetching -------------------------------------------------------------------------------------

async def _fetch(url: str, allow_private: bool, max_bytes: int, timeout_s: float) -> bytes:
    # trust_env=False: a proxy from the environment would resolve the name itself, behind our check.
    headers = {"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.8", "Accept-Encoding": "identity"}
    async with httpx.AsyncClient(timeout=timeout_s, trust_env=False, follow_redirects=False,
                                 headers=headers) as client:
        for _ in range(MAX_REDIRECTS + 1):
            parsed, addresses = await _checked_addresses(url, allow_private)
            async with _open(client, parsed, addresses) as response:
                if response.is_redirect:
                    url = str(parsed.join(response.headers["location"]))
                    continue
                if not response.is_success:
                    raise FetchError(f"the URL answered HTTP {response.status_code}")
                return await _read_capped(response, max_bytes)
    raise FetchError(f"the URL redirected more than {MAX_REDIRECTS} times")


@contextlib.asynccontextmanager
async def _open(client: httpx.AsyncClient, url: httpx.URL,
                addresses: list[IPAddress]) -> AsyncIterator[httpx.Response]:
    """Send the GET to the first checked address that accepts a connection."""
    failure: Exception | None = None
    for address in addresses:
        try:
            response = await client.send(_pinned_request(client, url, address), stream=True)
        except httpx.ConnectError as exc:
            failure = exc
            continue
        try:
            yield response
        finally:
            await response.aclose()
        return
    raise FetchError(f"could not connect to {url.host}: {failure}")


def _pinned_request(client: httpx.AsyncClient, url: httpx.URL, address: IPAddress) -> httpx.Request:
    """A request to `address` itself that still names the host: Host header, TLS SNI and certificate."""
    extensions = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}
    return client.build_request("GET", url.copy_with(host=str(address)),
                                headers={"Host": url.netloc.decode("ascii")}, extensions=extensions)


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FetchError(f"the URL's body is {declared} bytes, more than the {max_bytes} allowed", 413)
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise FetchError(f"the URL's body is more than the {max_bytes} bytes allowed", 413)
    return bytes(body)
