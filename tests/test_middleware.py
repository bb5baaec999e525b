"""An unexpected exception in a handler (a bug) still answers in the dialect's error shape."""

from __future__ import annotations

import json

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from xllm.server.middleware import errors
from xllm.server.routes import add_routes


async def _broken(request: web.Request) -> web.StreamResponse:
    raise OverflowError("date value out of range")


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
