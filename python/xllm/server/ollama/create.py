"""`POST /api/create` and `POST /api/copy`: the wire side of making models (models/create.py).

`create` takes the current ollama client's structured fields (`from` or `files`, `adapters`,
`template`, `system`, `parameters`, `messages`, `license`) or an older client's `modelfile` text
(folded into those fields here), and streams the steps as Ollama's progress records.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from xllm.errors import InvalidRequest
from xllm.models import create as models_create
from xllm.models import modelfile
from xllm.models.names import parse_digest
from xllm.server.http import MODEL_NAME, parse_body
from xllm.server.ollama.models import Record, model_name, progress_response, store_of
from xllm.server.ollama.models_wire import CopyRequest, CreateRequest
from xllm.server.ollama.wire import Options
from xllm.server.state import REGISTRY


async def copy(request: web.Request) -> web.Response:
    body = await parse_body(request, CopyRequest)
    source, dest = model_name(body.source, "source"), model_name(body.destination, "destination")
    store_of(request)  # a 400 without a store
    await models_create.copy(request.app[REGISTRY], source, dest)
    return web.Response(status=200)


def _merged(body: CreateRequest) -> CreateRequest:
    """The legacy `modelfile` text folded into the structured fields (which win)."""
    if body.modelfile is None:
        return body
    mf = modelfile.parse(body.modelfile)
    legacy: dict[str, Any] = {"from": mf.from_, "template": mf.template, "system": mf.system}
    if mf.parameters:
        legacy["parameters"] = mf.parameters
    if mf.messages:
        legacy["messages"] = [{"role": m.role, "content": m.content} for m in mf.messages]
    if mf.license:
        legacy["license"] = list(mf.license)
    if mf.adapters:
        legacy["adapters"] = {a: _uploaded(a, "ADAPTER") for a in mf.adapters}
    if mf.also_from:
        # a file by its digest; named as a GGUF, which is all `files` takes
        legacy["files"] = {
            f"{f.removeprefix('@')}.gguf": _uploaded(f, "FROM") for f in mf.also_from
        }
    given = body.model_dump(exclude_none=True, by_alias=True)
    fields = {**{k: v for k, v in legacy.items() if v is not None}, **given}
    return CreateRequest.model_validate(fields, strict=False)


def _uploaded(value: str, command: str) -> str:
    """The digest an older client's Modelfile names an uploaded file by (`@sha256:<hex>`)."""
    try:
        return parse_digest(value.removeprefix("@"))
    except InvalidRequest:
        field = "adapters" if command == "ADAPTER" else "files"
        raise InvalidRequest(
            f"{command} {value[:100]}: upload the file with POST /api/blobs/<digest> and name "
            f"it by digest ({command} @sha256:<hex>), or send `{field}`",
            param="modelfile",
        ) from None


def _parameters(values: dict[str, Any]) -> dict[str, Any]:
    """Typed as the Modelfile's, within the ranges a request's `options` must respect."""
    try:
        typed = modelfile.parameters(values)
    except ValueError as e:
        raise InvalidRequest(f"parameters: {e}", param="parameters") from None
    try:
        Options.model_validate(typed, strict=False)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(str(x) for x in err["loc"])
        raise InvalidRequest(f"parameters.{where}: {err['msg']}", param="parameters") from None
    return typed


async def create(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, CreateRequest)
    request[MODEL_NAME] = body.target()
    store_of(request)
    body = _merged(body)
    recipe = models_create.Recipe(
        name=model_name(body.target()),
        from_=body.from_,
        files=body.files,
        adapters=body.adapters,
        template=body.template,
        system=body.system,
        parameters=_parameters(body.parameters) if body.parameters else None,
        messages=[m.model_dump() for m in body.messages] if body.messages is not None else None,
        license=[body.license] if isinstance(body.license, str) else body.license,
        quantize=body.quantize,
    )
    statuses = await models_create.create(request.app[REGISTRY], recipe)

    async def replay() -> AsyncGenerator[Record, None]:
        for status in statuses:
            yield {"status": status}

    return await progress_response(request, replay(), body.stream)
