"""Who may talk to the server: Host guard, CORS, API keys, and refusing work while draining.

Decisions (SPEC "Decisions" 1): while bound to loopback, a request whose `Host` is not this
machine is refused (DNS rebinding, CVE-2024-28224), and the default CORS setting `*` is narrowed
to local origins, as Ollama does; an explicit origin list is used as given. API keys protect
every endpoint but `/v0/health` and the planner page's files.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from xllm.config import Settings
from xllm.errors import Forbidden, Overloaded, PayloadTooLarge, Unauthorized, UnsupportedEncoding
from xllm.server.drain import DRAIN, SHUTTING_DOWN
from xllm.server.http import MAX_BODY, TOO_LARGE
from xllm.server.image_files import PREFIX as IMAGES
from xllm.server.middleware import Handler, error_response

CORS_ORIGIN = web.RequestKey("cors_origin", str)
OPEN_PATHS = frozenset({"/v0/health"})
PAGES = "/v0/ui/"
"""The planner page's files: open, since a browser cannot send a key when it navigates (they
hold no data; the page sends the key the user types with each of its API calls)."""
BLOBS = "/api/blobs/"
"""Model uploads: streamed to disk and verified, so the 50 MB body limit does not apply."""
MANAGEMENT = frozenset({"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"})
"""What `server.model_management: false` turns off (with blob uploads): the endpoints that
change the store, for servers exposed to clients that should only run models."""
_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"}
_LOCAL_SCHEMES = {"app", "file", "tauri", "vscode-webview"}
ALLOW_HEADERS = "Authorization, Content-Type, X-Request-ID, User-Agent, Accept"
ALLOW_METHODS = "GET, POST, PUT, DELETE, HEAD, OPTIONS"


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _hostname(value: str) -> str:
    """`Host` header or origin authority -> bare lower-case host name."""
    return (urlsplit(f"//{value}").hostname or "").lower()


def _local_host(name: str) -> bool:
    return name in _LOCAL_NAMES or name.endswith(".localhost") or is_loopback(name)


def _origin_allowed(origin: str, allowed: Sequence[str], loopback: bool) -> bool:
    if "*" in allowed and not loopback:
        return True
    if origin in allowed:
        return True
    if "*" not in allowed:
        return False
    parts = urlsplit(origin)
    return parts.scheme in _LOCAL_SCHEMES or (
        parts.scheme in ("http", "https") and _local_host((parts.hostname or "").lower())
    )


def guard(settings: Settings) -> Middleware:
    loopback = is_loopback(settings.host)
    keys = [k.encode() for k in settings.api_keys]
    origins = list(settings.cors_origins)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if loopback and not _local_host(_hostname(request.host)):
            return error_response(
                request, Forbidden(f"host {request.host!r} is not allowed for a local server")
            )
        origin = request.headers.get("Origin")
        cors = origin is not None and _origin_allowed(origin, origins, loopback)
        if cors and origin:
            request[CORS_ORIGIN] = origin
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response: web.StreamResponse = web.Response(status=204 if cors else 403)
        elif (request.content_length or 0) > MAX_BODY and not request.path.startswith(BLOBS):
            # refused before reading a byte of it; chunked bodies stop at the limit while read
            response = error_response(request, PayloadTooLarge(TOO_LARGE))
        elif request.body_exists and _compressed(request):
            response = error_response(
                request,
                UnsupportedEncoding(
                    f"Content-Encoding {request.headers['Content-Encoding']!r} is not "
                    "supported: send the request body uncompressed"
                ),
            )
            response.headers["Accept-Encoding"] = "identity"  # RFC 7694
        elif keys and not _open(request.path) and not _authorized(request, keys):
            response = error_response(
                request, Unauthorized("missing or invalid API key (Authorization: Bearer <key>)")
            )
        elif not settings.model_management and _manages_models(request):
            response = error_response(
                request,
                Forbidden(f"{request.path}: model management is disabled on this server"),
            )
        elif request.app[DRAIN].draining and request.path not in OPEN_PATHS:
            response = error_response(request, Overloaded(SHUTTING_DOWN))
            response.force_close()  # the client should find another server, not wait here
        else:
            with request.app[DRAIN].track():
                response = await handler(request)
        return response

    return middleware


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` hook: CORS headers for allowed origins, before the first byte."""
    origin = request.get(CORS_ORIGIN)
    if origin is None:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Vary"] = "Origin"
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
        response.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
        response.headers["Access-Control-Max-Age"] = "600"


def _open(path: str) -> bool:
    """The health check, the planner page's files, and generated images (a browser shows one
    by URL, with no key: its random id is its secret, as OpenAI's image URLs are signed)."""
    return path in OPEN_PATHS or any(
        path.startswith(p) and "/" not in path[len(p) :] for p in (PAGES, IMAGES)
    )


def _compressed(request: web.Request) -> bool:
    """Compressed bodies are refused unread (the server never inflates them): 1 MB of gzip can
    inflate to gigabytes, and no OpenAI or Ollama client compresses what it sends."""
    return request.headers.get("Content-Encoding", "identity").strip().lower() != "identity"


def _manages_models(request: web.Request) -> bool:
    return request.path in MANAGEMENT or request.path.startswith(BLOBS)


def _authorized(request: web.Request, keys: list[bytes]) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = token.strip().encode()
    # compare against every key so timing does not tell which one nearly matched
    return any([hmac.compare_digest(given, k) for k in keys])
