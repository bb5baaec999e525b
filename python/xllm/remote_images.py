"""Fetching an image a request names by http(s) URL, where the server allows it.

Off by default (`remote_images`): a server that fetches URLs for its clients can be made to
reach what only it can reach. When allowed, a fetch connects only to public addresses: every
name is resolved here and each address checked before the connection (so a name that
resolves to a private address, or to one that changed since, is never reached), an address
in the URL is checked as such, and each redirect is checked again. A fetch takes at most
`TIMEOUT` seconds and `MAX_BYTES` bytes.
"""

from __future__ import annotations

import ipaddress
import socket

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from xllm import __version__
from xllm.images import Source, refusal

MAX_BYTES = 10 * 2**20
TIMEOUT = 10.0
MAX_REDIRECTS = 3


class _Refused(Exception):
    """An address the fetch must not reach."""


def _public(host: str) -> bool:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return ip.is_global and (mapped is None or mapped.is_global)


class _PublicResolver(AbstractResolver):
    """Names resolved as usual, refused when any of their addresses is not public."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        if not found or not all(_public(r["host"]) for r in found):
            raise _Refused(host)
        return found

    async def close(self) -> None:
        await self._inner.close()


async def fetch(source: Source) -> bytes:
    """The bytes at `source`'s URL; a 400 naming its field when the URL is not public, the
    server answers with an error, or the image is too large or too slow to come."""
    url = URL(source.value)
    connector = aiohttp.TCPConnector(resolver=_PublicResolver(), use_dns_cache=False)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    # never inflated here: a small gzip body must not become gigabytes before the size cap
    headers = {"User-Agent": f"xllm/{__version__}", "Accept-Encoding": "identity"}
    try:
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=headers, auto_decompress=False
        ) as http:
            for _ in range(MAX_REDIRECTS + 1):
                _check_url(url, source)
                async with http.get(url, allow_redirects=False) as response:
                    if response.status in (301, 302, 303, 307, 308):
                        url = url.join(URL(response.headers.get("Location", "")))
                        continue
                    if response.status != 200:
                        raise refusal(source, f"fetching the image got HTTP {response.status}")
                    if (response.content_length or 0) > MAX_BYTES:
                        raise refusal(source, _too_large())
                    data = bytearray()
                    async for chunk in response.content.iter_chunked(1 << 16):
                        data += chunk
                        if len(data) > MAX_BYTES:
                            raise refusal(source, _too_large())
                    return bytes(data)
            raise refusal(source, f"more than {MAX_REDIRECTS} redirects")
    except _Refused as e:
        raise refusal(source, f"{e} is not a public address; image URLs may not reach it") from None
    except TimeoutError:
        raise refusal(source, f"the image did not arrive within {TIMEOUT:g} s") from None
    except aiohttp.ClientError as e:
        raise refusal(source, f"cannot fetch the image: {e or type(e).__name__}") from None


def _check_url(url: URL, source: Source) -> None:
    if url.scheme not in ("http", "https") or not url.host:
        raise refusal(source, "only http(s) image URLs are fetched")
    try:
        literal = _public(url.host.strip("[]"))
    except ValueError:
        return  # a name: the resolver checks its addresses
    if not literal:
        raise _Refused(url.host)


def _too_large() -> str:
    return f"the image is larger than {MAX_BYTES // 2**20} MB"
