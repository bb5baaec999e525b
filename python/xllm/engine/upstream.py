"""The upstreams of remote engines: OpenAI-compatible servers (vLLM, a Ray Serve or llm-d
gateway, llama-server, another xllm) whose models this server serves as its own.

One `Pool` per configured endpoint (`engines.remote` in config.yaml) holds its base URLs, each
an `Upstream` with its health and counters. Requests go to a healthy one, the least busy
(`least_outstanding`) or in turn (`round_robin`); one that cannot be reached is marked down and
the request tried on the next, before anything was sent to the client. A watch checks every
base URL each `health_interval` (vLLM's and llama-server's `/health`, xllm's `/v0/health`,
else `/v1/models`, whose list also gives the upstream's models and vLLM's `max_model_len`).
With none up, requests get a 503 with `Retry-After`.

The API key comes from the environment or a file, is sent to the configured hosts only (no
redirect is followed: a 3xx is an error) and never logged; TLS is verified unless the endpoint
says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import orjson

from xllm.config import ConfigError, RemoteEndpoint
from xllm.errors import InvalidRequest, Overloaded, UpstreamError, UpstreamTimeout

log = logging.getLogger("xllm.remote")

PREFIX = "remote:"
"""Model names `remote:ENDPOINT/upstream-model` (and Modelfiles' `FROM remote:...`)."""
MAX_ERROR_BODY = 64 * 1024
"""Of an upstream's error answer, this much is read for its message."""
MAX_BODY = 64 * 1024 * 1024
"""An upstream's whole (non-streamed) answer is read up to this (embeddings of big batches)."""
_CONNECT_ERRORS = (aiohttp.ClientConnectionError, OSError)

State = Literal["unknown", "up", "down"]


@dataclass
class Upstream:
    """One base URL of an endpoint: its health and what went through it."""

    url: str
    state: State = "unknown"
    """`unknown` until the first check answers (requests may still go to it)."""
    error: str | None = None
    """Why it is down."""
    latency_ms: float | None = None
    """The last health check's round trip."""
    checked_at: float | None = None
    outstanding: int = 0
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    """Time spent on requests (from sending to the end of the answer), all together."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "state": self.state,
            "error": self.error,
            "latency_ms": self.latency_ms,
            "checked_at": self.checked_at,
            "outstanding": self.outstanding,
            "requests": self.requests,
            "errors": self.errors,
        }


class Call:
    """One request on an upstream: its response, and its place in the upstream's counters."""

    def __init__(self, pool: Pool, upstream: Upstream) -> None:
        self.pool = pool
        self.upstream = upstream
        self.response: aiohttp.ClientResponse | None = None
        self._t0 = time.perf_counter()
        self._open = True
        upstream.outstanding += 1
        upstream.requests += 1

    @property
    def closed(self) -> bool:
        """Closed here (done, or cancelled: then a read it breaks is no upstream failure)."""
        return not self._open

    def timeout(self) -> UpstreamTimeout:
        return UpstreamTimeout(
            f"remote endpoint {self.pool.name!r} ({self.upstream.url}) sent nothing for "
            f"{self.pool.endpoint.timeout:g} s (its timeout)"
        )

    def broken(self, e: BaseException) -> UpstreamError:
        """The error for a connection that failed mid-answer (marks the upstream down)."""
        self.pool._mark(self.upstream, False, _describe(e))
        return UpstreamError(
            f"remote endpoint {self.pool.name!r} ({self.upstream.url}) broke off its answer: "
            f"{_describe(e)}"
        )

    def close(self, failed: bool = False) -> None:
        """Release the connection (closing it if the answer is not all read); idempotent."""
        if not self._open:
            return
        self._open = False
        if self.response is not None:
            self.response.close()
        u = self.upstream
        u.outstanding -= 1
        u.errors += failed
        u.seconds += time.perf_counter() - self._t0


@dataclass(frozen=True)
class Target:
    """A remote model: its endpoint's pool and its name there."""

    pool: Pool
    model: str

    @property
    def name(self) -> str:
        """`remote:ENDPOINT/model`."""
        return f"{PREFIX}{self.pool.name}/{self.model}"


class _Secret:
    """A key that never shows in a repr or a log line."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<secret>"


def _api_key(endpoint: RemoteEndpoint) -> _Secret | None:
    where = f"engines.remote {endpoint.name!r}"
    if endpoint.api_key_env:
        value = os.environ.get(endpoint.api_key_env, "").strip()
        if not value:
            raise ConfigError(f"{where}: api_key_env {endpoint.api_key_env} is not set")
        return _Secret(value)
    if endpoint.api_key_file:
        path = Path(endpoint.api_key_file).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"{where}: cannot read api_key_file {path}: {e.strerror}") from None
        if not lines or not lines[0].strip():
            raise ConfigError(f"{where}: api_key_file {path} is empty")
        return _Secret(lines[0].strip())
    return None


class Pool:
    """An endpoint's base URLs, balanced and health-checked."""

    def __init__(self, endpoint: RemoteEndpoint) -> None:
        self.endpoint = endpoint
        self.name = endpoint.name
        self.upstreams = [Upstream(u) for u in endpoint.base_urls]
        self.models: dict[str, dict[str, Any]] = {}
        """The upstream's `/v1/models` entries by id, from the last check that listed them."""
        self._key = _api_key(endpoint)
        self._turn = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self._watch: asyncio.Task[None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            e = self.endpoint
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=e.connect_timeout, sock_read=e.timeout
                ),
                connector=aiohttp.TCPConnector(ssl=e.verify_tls, limit=0),
                auto_decompress=True,
            )
        return self._session

    def start(self) -> None:
        """Begin the health checks (in the running loop)."""
        if self._watch is None:
            self._watch = asyncio.create_task(self._watch_health())

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self._session is not None:
            await self._session.close()

    def headers(self) -> dict[str, str]:
        h = {"Accept-Encoding": "identity"}
        if self._key is not None:
            h["Authorization"] = f"Bearer {self._key.value}"
        return h

    # --- health ------------------------------------------------------------------------------

    @property
    def health_path(self) -> str:
        return {"vllm": "/health", "llama-server": "/health", "xllm": "/v0/health"}.get(
            self.endpoint.flavour, "/v1/models"
        )

    async def _watch_health(self) -> None:
        while True:
            await asyncio.gather(*(self.check(u) for u in self.upstreams))
            await asyncio.sleep(self.endpoint.health_interval)

    async def check(self, u: Upstream) -> None:
        """One health check of `u`; when it is up, its model list too."""
        t0 = time.perf_counter()
        timeout = aiohttp.ClientTimeout(total=min(self.endpoint.timeout, 10.0))
        try:
            if self.health_path != "/v1/models":
                async with self.session.get(
                    u.url + self.health_path, headers=self.headers(), allow_redirects=False,
                    timeout=timeout,
                ) as r:  # fmt: skip
                    await r.read()
                    if r.status != 200:
                        raise _Unhealthy(f"health check answered HTTP {r.status}")
            await self._list_models(u, timeout)
            ok, reason = True, None
        except _Unhealthy as e:
            ok, reason = False, str(e)
        except (TimeoutError, UpstreamError, *_CONNECT_ERRORS) as e:
            ok, reason = False, _describe(e)
        u.latency_ms = round((time.perf_counter() - t0) * 1000, 3)
        u.checked_at = time.time()
        self._mark(u, ok, reason)

    async def _list_models(self, u: Upstream, limit: aiohttp.ClientTimeout) -> None:
        async with self.session.get(
            u.url + "/v1/models", headers=self.headers(), allow_redirects=False, timeout=limit
        ) as r:
            if r.status != 200:
                raise _Unhealthy(f"/v1/models answered HTTP {r.status}")
            try:
                data = orjson.loads(await read_body(r, MAX_ERROR_BODY * 16))
            except orjson.JSONDecodeError:
                raise _Unhealthy("/v1/models answered something other than JSON") from None
        entries = data.get("data") if isinstance(data, dict) else None
        if isinstance(entries, list):
            self.models = {
                m["id"]: m for m in entries if isinstance(m, dict) and isinstance(m.get("id"), str)
            }

    def _mark(self, u: Upstream, ok: bool, reason: str | None) -> None:
        state: State = "up" if ok else "down"
        if state != u.state:
            if ok:
                log.info("upstream %s of %s is up", u.url, self.name)
            else:
                log.warning("upstream %s of %s is down: %s", u.url, self.name, reason)
        u.state, u.error = state, reason

    # --- balancing ---------------------------------------------------------------------------

    def _candidates(self, tried: set[int]) -> list[int]:
        usable = [i for i, u in enumerate(self.upstreams) if u.state != "down" and i not in tried]
        if not usable:
            return []
        start = next(self._turn) % len(self.upstreams)
        usable.sort(key=lambda i: (i - start) % len(self.upstreams))  # in turn from `start`
        if self.endpoint.balance == "least_outstanding":
            usable.sort(key=lambda i: self.upstreams[i].outstanding)  # stable: turn breaks ties
        return usable

    def _unavailable(self) -> Overloaded:
        retry = max(1, round(self.endpoint.health_interval))
        why = "; ".join(f"{u.url}: {u.error or u.state}" for u in self.upstreams)
        return Overloaded(
            f"remote endpoint {self.name!r} has no healthy upstream ({why})", retry_after=retry
        )

    async def open(self, path: str, body: Mapping[str, Any]) -> Call:
        """POST `body` (JSON) to `path` on a healthy upstream: the open call once it answered
        200; any other answer is raised as xllm's error with the upstream's message. An
        upstream that cannot be reached is marked down and the next one tried; none left is a
        503. Closing the call early (a client gone) closes the upstream connection, which vLLM
        and xllm take as the request's cancellation."""
        data = orjson.dumps(body)
        headers = {**self.headers(), "Content-Type": "application/json"}
        tried: set[int] = set()
        while True:
            order = self._candidates(tried)
            if not order:
                raise self._unavailable()
            u = self.upstreams[order[0]]
            tried.add(order[0])
            call = Call(self, u)
            try:
                response = await self.session.post(
                    u.url + path, data=data, headers=headers, allow_redirects=False
                )
            except asyncio.CancelledError:  # the client went away before the answer began
                call.close()
                raise
            except aiohttp.ConnectionTimeoutError as e:  # never reached: try the next one
                call.close(failed=True)
                self._mark(u, False, _describe(e))
                continue
            except TimeoutError:
                call.close(failed=True)
                raise call.timeout() from None
            except _CONNECT_ERRORS as e:
                call.close(failed=True)
                self._mark(u, False, _describe(e))
                continue
            call.response = response
            if response.status != 200:
                try:
                    error = await _error(self.name, u, response)
                except asyncio.CancelledError:
                    call.close()
                    raise
                except (TimeoutError, *_CONNECT_ERRORS):
                    error = UpstreamError(f"remote endpoint {self.name!r}: HTTP {response.status}")
                call.close(failed=response.status >= 500 or response.status < 400)
                raise error
            return call

    def state(self) -> dict[str, Any]:
        """For /v0/health."""
        return {
            "name": self.name,
            "flavour": self.endpoint.flavour,
            "balance": self.endpoint.balance,
            "models": dict(self.endpoint.models),
            "upstreams": [u.as_dict() for u in self.upstreams],
        }


class _Unhealthy(Exception):
    """A health check's answer that says the upstream cannot serve."""


def _describe(e: BaseException) -> str:
    if isinstance(e, aiohttp.ConnectionTimeoutError):
        return "could not connect in time"
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, UpstreamError):
        return e.message
    return str(e) or type(e).__name__


async def read_body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """An upstream's whole answer, refused past `limit` bytes."""
    data = bytearray()
    async for chunk in response.content.iter_chunked(256 * 1024):
        data += chunk
        if len(data) > limit:
            raise UpstreamError(f"the upstream's answer is larger than {limit} bytes")
    return bytes(data)


async def _error(pool: str, u: Upstream, r: aiohttp.ClientResponse) -> Exception:
    """xllm's error for an upstream's non-200 answer, with the upstream's own message."""
    if 300 <= r.status < 400:
        where = r.headers.get("Location", "elsewhere")
        return UpstreamError(
            f"remote endpoint {pool!r} ({u.url}) answered with a redirect (HTTP {r.status}) to "
            f"{where}; redirects are not followed, so the API key never goes to another host: "
            "configure the final URL"
        )
    raw = await r.content.read(MAX_ERROR_BODY)  # a prefix is enough for a message
    message = upstream_message(raw) or f"HTTP {r.status}"
    text = f"remote endpoint {pool!r}: {message}"
    if r.status in (401, 403):
        return UpstreamError(
            f"remote endpoint {pool!r} refused this server's credentials (HTTP {r.status}): "
            f"{message}; check its api_key_env"
        )
    if r.status in (429, 503):
        retry = r.headers.get("Retry-After", "1")
        return Overloaded(text, retry_after=int(retry) if retry.isdigit() else 1)
    if r.status in (400, 413, 422):
        return InvalidRequest(text)
    if r.status == 404:
        return UpstreamError(text, status=404)
    return UpstreamError(text)


def upstream_message(raw: bytes) -> str:
    """The message of an upstream's error body: OpenAI's `{"error": {"message"}}`, Ollama's
    `{"error": "..."}`, FastAPI's `{"detail": ...}` (older vLLM), or its text."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace").strip()[:1000]
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return str(err)[:1000]
    return str(data)[:1000]


@dataclass
class Remotes:
    """Every configured endpoint, and the local names of their models."""

    pools: dict[str, Pool] = field(default_factory=dict)

    @classmethod
    def of(cls, endpoints: tuple[RemoteEndpoint, ...]) -> Remotes:
        return cls({e.name: Pool(e) for e in endpoints})

    def named(self) -> dict[str, Target]:
        """Local model name → its remote model, from the endpoints' `models`."""
        return {
            local: Target(pool, upstream)
            for pool in self.pools.values()
            for local, upstream in pool.endpoint.models
        }

    def parse(self, name: str, param: str = "model") -> Target | None:
        """A `remote:ENDPOINT/model` name's target; None for any other name, a 400 for an
        endpoint this server does not have."""
        if not name.startswith(PREFIX):
            return None
        endpoint, _, model = name[len(PREFIX) :].partition("/")
        pool = self.pools.get(endpoint)
        if pool is None or not model:
            known = ", ".join(self.pools) or "none configured"
            raise InvalidRequest(
                f"{param}: {name!r} names no remote endpoint of this server (expected "
                f"remote:ENDPOINT/model; endpoints: {known})",
                param=param,
            )
        return Target(pool, model)

    def start(self) -> None:
        for p in self.pools.values():
            p.start()

    async def close(self) -> None:
        for p in self.pools.values():
            await p.close()
