"""Ollama's model endpoints: tags, show, pull, push, delete and blob uploads (create, copy:
`create.py`).

Handlers only translate; the store, pulling and the Modelfile live in `xllm.models`. Progress
streams are NDJSON of Ollama's `{"status", "digest", "total", "completed"}` records (one record,
the last, with `"stream": false`); an error after the stream began is an `{"error"}` record.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiohttp import web

from xllm.engine.registry import ModelRegistry, Resolved
from xllm.errors import InsufficientStorage, InvalidRequest, ModelNotFound, XllmError
from xllm.models import folders, gguf, loras, modelfile, pull, store, summary
from xllm.models.modelfile import Modelfile
from xllm.models.names import ModelName, parse_digest, parse_name
from xllm.models.store import Store
from xllm.server import streaming
from xllm.server.http import MODEL_NAME, json_response, parse_body
from xllm.server.ollama.models_wire import (
    DeleteRequest,
    PullRequest,
    PushRequest,
)
from xllm.server.ollama.wire import ShowRequest
from xllm.server.state import REGISTRY, SETTINGS

NDJSON = "application/x-ndjson"
Record = dict[str, Any]


class Facts(Protocol):
    """What `details` needs: a loaded model's ModelInfo or a file's Summary."""

    @property
    def architecture(self) -> str: ...

    @property
    def parameter_count(self) -> int: ...

    @property
    def quantization(self) -> str: ...

    @property
    def format(self) -> str: ...


def iso_time(ts: float) -> str:
    """A Unix time as Ollama writes times (RFC 3339, UTC)."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def details(info: Facts, parent: str = "") -> dict[str, Any]:
    return {
        "parent_model": parent,
        "format": info.format,
        "family": info.architecture,
        "families": [info.architecture],
        "parameter_size": summary.params_label(info.parameter_count),
        "quantization_level": info.quantization,
    }


def file_digest(path: Path) -> str:
    """A stable id for a model file (models given by path have no manifest digest)."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()


def name_digest(name: str) -> str:
    """A stable id for a model that has no file here (a remote one)."""
    return hashlib.sha256(name.encode()).hexdigest()


def store_of(request: web.Request) -> Store:
    s = request.app[REGISTRY].store
    if s is None:
        raise InvalidRequest("this server has no model store")
    return s


def model_name(text: str, param: str = "model") -> ModelName:
    if not text:
        raise InvalidRequest(f"{param} is required", param=param)
    try:
        return parse_name(text)
    except InvalidRequest as e:
        raise InvalidRequest(e.message, param=param) from None


def _files(path: Path) -> list[Path]:
    """A model file and, when it is the first of a split model, the others; a folder model's
    (or a voice's) files."""
    local = folders.local_files(path)
    if local is not None:
        return list(local[1].values())
    try:
        return gguf.model_files(path)
    except gguf.GGUFError:
        return [path]


# --- tags, show -----------------------------------------------------------------------------


def _tag(registry: ModelRegistry, name: str) -> tuple[float, dict[str, Any]]:
    found = registry.find(name)
    try:
        facts: dict[str, Any] = details(registry.facts(found))
    except (XllmError, OSError):
        facts = {"format": "gguf"}  # listed even when its header cannot be read
    if found.stored is not None:
        modified, size = found.stored.modified, found.stored.size
        digest = found.stored.digest.removeprefix("sha256:")
    elif found.remote is not None:
        modified, size, digest = registry.modified(found), 0, name_digest(found.remote.name)
    else:
        st = found.path.stat()
        modified, digest = st.st_mtime, file_digest(found.path)
        size = sum(f.stat().st_size for f in _files(found.path))
    entry = {
        "name": name,
        "model": name,
        "modified_at": iso_time(modified),
        "size": size,
        "digest": digest,
        "details": facts,
    }
    return modified, entry


def _tags(registry: ModelRegistry) -> list[dict[str, Any]]:
    entries = []
    for name in registry.available():
        with contextlib.suppress(XllmError, OSError):  # removed meanwhile
            entries.append(_tag(registry, name))
    return [e for _, e in sorted(entries, key=lambda x: -x[0])]  # newest first, as Ollama


async def tags(request: web.Request) -> web.Response:
    models = await asyncio.to_thread(_tags, request.app[REGISTRY])
    return json_response({"models": models})


def _parameters_text(params: dict[str, Any]) -> str:
    """Ollama's `parameters` string: one `name value` line per value, strings quoted."""
    lines = []
    for k, v in params.items():
        for item in v if isinstance(v, list) else [v]:
            value = json.dumps(item) if isinstance(item, str) else str(item).lower()
            lines.append(f"{k:<30} {value}")
    return "\n".join(lines)


def _show(registry: ModelRegistry, name: str, verbose: bool) -> dict[str, Any]:
    found = registry.find(name)
    facts = registry.facts(found)
    mf = found.stored.modelfile if found.stored is not None else Modelfile()
    info = dict(facts.model_info)
    if (
        verbose and facts.format == "gguf" and found.remote is None
    ):  # the tokenizer's arrays are in the GGUF header
        with registry.reading(found):
            header = gguf.read(found.path, keep_arrays=True)
        info.update({k: v for k, v in header.metadata.items() if k.startswith("tokenizer.")})
    template = mf.template if mf.template is not None else facts.chat_template or ""
    licenses = mf.license or ((facts.license,) if facts.license else ())
    shown = Modelfile(
        also_from=(str(found.projector),) if found.projector is not None else (),
        parameters=mf.parameters,
        template=template or None,
        system=mf.system,
        messages=mf.messages,
        adapters=tuple(map(str, found.stored.adapter_paths)) if found.stored else (),
        license=licenses,
    )
    text = (
        '# Modelfile generated by "xllm show"\n'
        "# To build a new Modelfile based on this, replace FROM with:\n"
        f"# FROM {found.name}\n\n" + modelfile.to_text(shown, from_=str(found.path))
    )
    if found.remote is not None:
        text = text.replace(f"FROM {found.path}", f"FROM {found.remote.name}")
    modified = registry.modified(found)
    out: dict[str, Any] = {
        "license": "\n".join(licenses),
        "modelfile": text,
        "parameters": _parameters_text(mf.parameters),
        "template": template,
        "details": details(facts),
        "model_info": info,
        "capabilities": facts.capabilities,
        "modified_at": iso_time(modified),
    }
    if facts.projector_info:
        out["projector_info"] = facts.projector_info
    if facts.format == "gguf" and found.remote is None:
        out["adapters"] = _adapters(registry, found)
    if mf.system is not None:
        out["system"] = mf.system
    if mf.messages:
        out["messages"] = [{"role": m.role, "content": m.content} for m in mf.messages]
    return out


def _adapters(registry: ModelRegistry, found: Resolved) -> list[dict[str, Any]]:
    """The LoRA adapters a request to the model may name (`lora`): its own, then those of the
    loras folder that fit it."""
    stored = found.stored

    def base() -> list[Path]:
        if stored is not None:
            return [stored.model_path, *stored.shard_paths]
        return gguf.model_files(found.path)

    own = stored.adapter_paths if stored is not None else ()
    folder = registry.options.loras_dir
    with registry.reading(found):
        usable = loras.available(own, Path(folder) if folder else None, base)
    return [{"name": a.name, "size": a.size, "own": a.own} for a in usable]


async def show(request: web.Request) -> web.Response:
    body = await parse_body(request, ShowRequest)
    name = model_name(body.target())
    request[MODEL_NAME] = name.display
    registry = request.app[REGISTRY]
    return json_response(await asyncio.to_thread(_show, registry, name.display, body.verbose))


# --- progress streams -----------------------------------------------------------------------


async def progress_response(
    request: web.Request, records: AsyncGenerator[Record, None], stream: bool
) -> web.StreamResponse:
    """Records as NDJSON, or only the last one. Errors before the first real step (the
    manifest lookup) are plain error responses with their status; later ones end the stream."""
    async with contextlib.aclosing(records) as it:
        if not stream:
            last: Record = {"status": "success"}
            async for record in it:
                last = record
            return json_response(last)
        head: list[Record] = []
        async for record in it:
            head.append(record)
            if len(head) == 2:
                break
        response = await streaming.open_stream(request, NDJSON)
        try:
            if not await streaming.write(response, b"".join(orjson.dumps(r) + b"\n" for r in head)):
                return response
            async for record in it:
                if not await streaming.write(response, orjson.dumps(record) + b"\n"):
                    return response  # the client left: closing the iterator cancels the work
        except XllmError as e:
            await streaming.finish(response, orjson.dumps(e.ollama_body()) + b"\n")
            return response
        await streaming.finish(response)
        return response


async def pull_model(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, PullRequest)
    name = model_name(body.target())
    request[MODEL_NAME] = name.display
    pull.check_parts(name, body.parts)
    records = pull.pull(store_of(request), request.app[SETTINGS], name, body.insecure, body.parts)
    return await progress_response(request, records, body.stream)


async def push_model(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, PushRequest)
    name = model_name(body.target())
    request[MODEL_NAME] = name.display
    records = pull.push(store_of(request), request.app[SETTINGS], name, body.insecure)
    return await progress_response(request, records, body.stream)


# --- delete, blobs -------------------------------------------------------------------------


async def delete(request: web.Request) -> web.Response:
    body = await parse_body(request, DeleteRequest)
    name = model_name(body.target())
    request[MODEL_NAME] = name.display
    registry = request.app[REGISTRY]
    if not store_of(request).manifest_path(name).is_file():  # one that cannot be read goes too
        raise ModelNotFound(f"model {name.display!r} not found", param="model")
    await registry.unload(name.display)
    if not await asyncio.to_thread(store_of(request).delete, name):
        raise ModelNotFound(f"model {name.display!r} not found", param="model")
    return web.Response(status=200)


def _digest(request: web.Request) -> str:
    try:
        return parse_digest(request.match_info["digest"])
    except InvalidRequest as e:
        raise InvalidRequest(e.message, param="digest") from None


async def blob_exists(request: web.Request) -> web.Response:
    return web.Response(status=200 if store_of(request).has_blob(_digest(request)) else 404)


async def upload_blob(request: web.Request) -> web.Response:
    """The body becomes blob `digest` only if it hashes to it (400 "digest mismatch")."""
    digest = _digest(request)
    s = store_of(request)
    length = request.content_length
    if length is not None and length > s.free_bytes():
        raise InsufficientStorage(f"not enough disk space for a blob of {length} bytes")
    async with s.writing(digest) as partial:
        if partial is None:
            return web.Response(status=200)  # present already
        try:
            partial.reset()
            buffer = bytearray()
            async for chunk in request.content.iter_chunked(store.CHUNK):
                buffer += chunk
                if len(buffer) >= store.CHUNK:
                    await asyncio.to_thread(partial.write, bytes(buffer))
                    buffer.clear()
            await asyncio.to_thread(partial.write, bytes(buffer))
            await asyncio.to_thread(partial.commit)
        except BaseException:
            partial.discard()
            raise
    return web.Response(status=201)
