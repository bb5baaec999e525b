"""The error middleware: every error in the shape of its route's dialect, which the route table
says (not the path), and an unexpected exception (a bug) still a JSON 500 in that shape."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from xllm.errors import InvalidRequest
from xllm.server.middleware import errors
from xllm.server.routes import Route, add_routes


async def _broken(request: web.Request) -> web.StreamResponse:
    raise OverflowError("date value out of range")


async def _refuse(request: web.Request) -> web.StreamResponse:
    raise InvalidRequest("temperature must be at most 2", param="temperature")


async def test_unexpected_exception_is_a_json_500() -> None:
    app = web.Application()
    add_routes(app)
    for path, shape in (("/v1/models", dict), ("/api/ps", str)):
        response = await errors(make_mocked_request("GET", path, app=app), _broken)
        assert isinstance(response, web.Response) and response.status == 500
        assert response.body is not None
        error = json.loads(bytes(response.body))["error"]  # type: ignore[arg-type]
        assert isinstance(error, shape)
        assert "internal error (OverflowError)" in str(error)


@pytest.fixture
async def table_client() -> AsyncIterator[TestClient[Any, Any]]:
    """An app whose table declares dialects against the paths' prefixes."""
    app = web.Application(middlewares=[errors])
    add_routes(
        app,
        (
            Route("POST", "/v1/native", _refuse, "Ollama's, under /v1/", dialect="ollama"),
            Route("POST", "/api/openai", _refuse, "OpenAI's, under /api/", dialect="openai"),
            Route("POST", "/v0/own", _refuse, "xllm's own: OpenAI's shape"),
        ),
    )
    async with TestClient(TestServer(app)) as c:
        yield c


OPENAI = {
    "error": {
        "message": "temperature must be at most 2",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": None,
    }
}
OLLAMA = {"error": "temperature must be at most 2"}


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/native", OLLAMA), ("/api/openai", OPENAI), ("/v0/own", OPENAI)],
)
async def test_the_same_error_takes_the_shape_the_table_declares(
    table_client: TestClient[Any, Any], path: str, body: dict[str, Any]
) -> None:
    r = await table_client.post(path)
    assert r.status == 400 and await r.json() == body


@pytest.mark.parametrize(
    ("method", "path", "status", "shape"),
    [
        ("GET", "/v1/native", 405, str),  # another method on a route: that route's dialect
        ("GET", "/api/openai", 405, dict),
        ("GET", "/v1/nope", 404, str),  # no route: that of the routes under its first segment
        ("GET", "/api/nope", 404, dict),
        ("GET", "/elsewhere", 404, dict),  # and OpenAI's where none is
    ],
)
async def test_paths_no_route_serves_take_their_neighbours_dialect(
    table_client: TestClient[Any, Any], method: str, path: str, status: int, shape: type
) -> None:
    r = await table_client.request(method, path)
    assert r.status == status and isinstance((await r.json())["error"], shape)
