"""Blobs over HTTP into the store: redirects followed safely, resumed ranges, SHA-256, progress.

Credentials never leave the host they were meant for: redirects are followed by hand, the
`Authorization` header is dropped when one leads to another host, and a redirect from a public
host to a loopback, link-local or private address is refused (RELIABILITY item 10). Bodies are
read raw (no transparent gzip), and never beyond the size the manifest declared.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from yarl import URL

from xllm import __version__
from xllm.errors import InsufficientStorage, RegistryError, XllmError
from xllm.models.store import CHUNK, DigestMismatch, Partial, Store

MAX_REDIRECTS = 5
PROGRESS_S = 0.25
"""How often a running transfer reports progress."""
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CREDENTIALS = ("Authorization", "Cookie")


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120),
        headers={"User-Agent": f"xllm/{__version__}"},
    )


def _internal(host: str | None) -> bool:
    if not host:
        return True
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_unspecified


def _same_origin(a: URL, b: URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


@contextlib.asynccontextmanager
async def request(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> AsyncIterator[aiohttp.ClientResponse]:
    """A request whose redirects are followed by the rules above."""
    origin = current = URL(url)
    sent = dict(headers or {})
    for _ in range(MAX_REDIRECTS + 1):
        if current.scheme not in ("http", "https"):
            raise RegistryError(f"refusing to fetch {current.scheme}: URL {str(current)[:200]}")
        try:
            response = await http.request(
                method, current, headers=sent, allow_redirects=False, **kwargs
            )
        except (aiohttp.ClientError, TimeoutError) as e:
            raise RegistryError(f"cannot reach {current.host}: {e or type(e).__name__}") from None
        if response.status not in _REDIRECTS:
            try:
                yield response
            finally:
                response.release()
            return
        location = response.headers.get("Location", "")
        response.release()
        target = current.join(URL(location))
        if _internal(target.host) and not _internal(origin.host):
            raise RegistryError(f"refusing a redirect from {origin.host} to {target.host}")
        if not _same_origin(target, origin):
            sent = {k: v for k, v in sent.items() if k.title() not in _CREDENTIALS}
        current = target
    raise RegistryError(f"too many redirects fetching {url[:200]}")


async def fetch(
    http: aiohttp.ClientSession,
    store: Store,
    digest: str,
    size: int,
    url: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Download blob `digest` (`size` bytes) from `url` into the store, verified.

    A connection lost midway keeps the partial, and the next attempt asks for the rest with a
    Range request; bytes that do not verify are thrown away.
    """
    async with store.writing(digest) as partial:
        if partial is None:
            return  # present already, or another pull just finished it
        partial.total = size
        have = await asyncio.to_thread(partial.resume)
        if have > size:
            partial.reset()
        try:
            if partial.written < size:
                await _transfer(http, partial, size, url, dict(headers or {}))
        except InsufficientStorage:
            partial.discard()  # the disk is full: keeping the partial would keep it full
            raise
        if partial.written != size:  # a whole response, of the wrong length: not resumable
            partial.discard()
            raise RegistryError(
                f"the server sent {partial.written} of the {size} bytes of {digest}"
            )
        try:
            await asyncio.to_thread(partial.commit)
        except DigestMismatch as e:
            partial.discard()
            raise RegistryError(f"{e.message}; the file was deleted") from None


async def _transfer(
    http: aiohttp.ClientSession, partial: Partial, size: int, url: str, headers: dict[str, str]
) -> None:
    if partial.written:
        headers["Range"] = f"bytes={partial.written}-"
    headers["Accept-Encoding"] = "identity"
    async with request(http, "GET", url, headers) as response:
        if response.status == 206 and partial.written:
            first = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
            if first != str(partial.written):
                partial.reset()
                raise RegistryError(f"the server resumed {partial.digest} at the wrong offset")
        elif response.status == 200:
            partial.reset()
        elif response.status == 404:
            raise RegistryError(f"blob {partial.digest} not found at {URL(url).host}")
        else:
            raise RegistryError(f"fetching {partial.digest}: HTTP {response.status}")
        buffer = bytearray()
        try:
            async for chunk in response.content.iter_chunked(CHUNK):
                if partial.written + len(buffer) + len(chunk) > size:
                    partial.discard()
                    raise RegistryError(
                        f"the server sent more than the {size} bytes of {partial.digest}"
                    )
                buffer += chunk
                if len(buffer) >= CHUNK:
                    await asyncio.to_thread(partial.write, bytes(buffer))
                    buffer.clear()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise RegistryError(
                f"download of {partial.digest} interrupted: {e or type(e).__name__}"
            ) from None
        finally:
            if buffer:
                await asyncio.to_thread(partial.write, bytes(buffer))


Progress = dict[str, Any]


async def reporting(
    work: Awaitable[None], status: str, digest: str, total: int, done: Callable[[], int]
) -> AsyncIterator[Progress]:
    """Run `work`, yielding Ollama's progress record every PROGRESS_S until it ends.

    Leaving early (the client went away) cancels the work.
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            finished, _ = await asyncio.wait({task}, timeout=PROGRESS_S)
            if finished:
                task.result()  # raises the work's error
                yield {"status": status, "digest": digest, "total": total, "completed": total}
                return
            yield {"status": status, "digest": digest, "total": total, "completed": done()}
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, XllmError):
                await task


async def read_limited(response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """A whole (small) body, refused past `limit` bytes."""
    data = bytearray()
    try:
        async for chunk in response.content.iter_chunked(64 * 1024):
            data += chunk
            if len(data) > limit:
                raise RegistryError(f"{what} is larger than {limit} bytes")
    except (aiohttp.ClientError, TimeoutError) as e:
        raise RegistryError(f"reading {what}: {e or type(e).__name__}") from None
    return bytes(data)
