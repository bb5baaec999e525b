"""New models in the store from stored, bundled or uploaded ones: the manifests `/api/create`
and `/api/copy` (and `xllm create`, `xllm cp` through them) build.

Each of a recipe's parts becomes a layer of the new manifest, the rest is inherited from the
base model. `files` may be every file of a GGUF split into several (and a vision projector, an
`mmproj` GGUF told by its metadata, checked to fit the model), or the files of a model of a
folder format (a Whisper model's model.bin, config.json...; a Piper voice's .onnx and
.onnx.json; a diffusion model's parts, named by part); `adapters` are LoRA GGUFs, checked
against the base model's tensors before they are kept.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xllm.engine.llamacpp_archs import ARCHITECTURES
from xllm.engine.upstream import PREFIX
from xllm.errors import InvalidRequest, ModelNotFound
from xllm.models import adapter, convert, folders, gguf, gotemplate, store, summary
from xllm.models import projector as mmproj
from xllm.models.convert import quantize
from xllm.models.gguf import GGUFError
from xllm.models.modelfile import is_go_template
from xllm.models.names import ModelName, parse_digest, parse_name
from xllm.models.store import Layer, Manifest, Store, StoredModel

if TYPE_CHECKING:
    from xllm.engine.registry import ModelRegistry


@dataclass(frozen=True)
class Recipe:
    """What a new model is made of (a request's fields, checked)."""

    name: ModelName
    from_: str | None = None
    files: Mapping[str, str] | None = None
    """Uploaded GGUF file(s), or a folder model's files: name -> digest."""
    adapters: Mapping[str, str] | None = None
    template: str | None = None
    system: str | None = None
    parameters: Mapping[str, Any] | None = None
    messages: Sequence[Mapping[str, str]] | None = None
    license: Sequence[str] | None = None
    quantize: str | None = None


async def _base(registry: ModelRegistry, name: str) -> Manifest:
    """The manifest of model `name`; a bundled or command-line model's file (or files, split,
    or a folder model's) is copied into the store first (its manifest then has the model's
    layers only), a safetensors model is converted to a GGUF one (as Ollama's create does)."""
    found = registry.find(name)
    s = registry.store
    assert s is not None
    if found.stored is not None and found.stored.format == store.SAFETENSORS_FORMAT:
        folder = await asyncio.to_thread(s.model_dir, found.stored)
        return await _made(s, lambda out: convert.convert(folder, out))
    if found.stored is not None:
        await asyncio.to_thread(registry.facts, found)  # a file damaged on disk is a 500
        return found.stored.manifest
    local = await asyncio.to_thread(folders.local_files, found.path)
    if local is not None:
        fmt, paths = local
        return await _folder_manifest(s, fmt, {n: await s.add_file(p) for n, p in paths.items()})
    layers = []
    for i, path in enumerate(await asyncio.to_thread(gguf.model_files, found.path)):
        digest = await s.add_file(path)
        layers.append(Layer(store.SHARD if i else store.MODEL, digest, path.stat().st_size))
    if found.projector is not None:  # served with --mmproj
        digest = await s.add_file(found.projector)
        layers.append(Layer(store.PROJECTOR, digest, found.projector.stat().st_size))
    return Manifest(layers[0], tuple(layers))


async def _made(s: Store, make: Callable[[Path], object]) -> Manifest:
    """A manifest of one GGUF that `make` writes (in a worker thread) to a file given."""
    tmp = s.tmp_dir / f"{os.getpid()}-{secrets.token_hex(8)}.gguf"
    s.tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        await asyncio.to_thread(make, tmp)
        digest = await s.add_file(tmp)
        layer = Layer(store.MODEL, digest, tmp.stat().st_size)
    finally:
        tmp.unlink(missing_ok=True)
    return Manifest(layer, (layer,))


async def _quantized(s: Store, base: Manifest, kind: str) -> Manifest:
    """`base` with its GGUF quantized to `kind` by llama.cpp (its other layers kept)."""
    if base.find(store.SHARD) is not None:
        raise InvalidRequest("quantize: a split GGUF cannot be quantized", param="quantize")
    quantize.file_type(kind)  # an unknown type is a 400 before any work
    model = base.layers[[x.media_type for x in base.layers].index(store.MODEL)]
    src = s.blob_path(model.digest)
    with s.pinned([model.digest]):
        made = await _made(s, lambda out: quantize.quantize(src, out, kind))
    layers = tuple(made.layers[0] if x is model else x for x in base.layers)
    return Manifest(base.config, layers)


async def _folder_manifest(
    s: Store, fmt: folders.FolderFormat, files: Mapping[str, str]
) -> Manifest:
    """The manifest of a folder model whose files (name -> digest) are in the store, with the
    config blob naming them; a 400 for files its format refuses (not kept)."""
    for n in files:
        if not fmt.is_file(n):
            s.remove_unused(files.values())
            raise InvalidRequest(f"files: {n[:100]!r} is not a file of a {fmt.name} model",
                                 param="files")  # fmt: skip
    layers = tuple(
        Layer(fmt.weights if fmt.is_weights(n) else store.MODEL_FILE, d,
              s.blob_path(d).stat().st_size)
        for n, d in sorted(files.items())
    )  # fmt: skip
    config = json.dumps({"model_format": fmt.name, "files": dict(sorted(files.items()))}).encode()
    with s.pinned(files.values()):
        digest = await s.add_bytes(config)
        manifest = Manifest(Layer(store.CONFIG_TYPE, digest, len(config)), layers)
        try:
            await asyncio.to_thread(s.summary_of, manifest)  # names, completeness, contents
        except InvalidRequest as e:
            await asyncio.to_thread(s.remove_unused, [*files.values(), digest])
            raise InvalidRequest(f"files: {e.message}", param="files") from None
    return manifest


async def _write_model(
    s: Store,
    name: ModelName,
    layers: tuple[Layer, ...],
    parent: str = "",
    config_layer: Layer | None = None,
) -> StoredModel:
    """Publish a manifest of `layers` (blobs present) with a config blob: made here for a GGUF
    model (one model layer) or a remote one, `config_layer` (which names its files) for a
    folder model."""
    if config_layer is not None:
        manifest = Manifest(config_layer, layers)
        with s.pinned(x.digest for x in manifest.blobs()):
            return await asyncio.to_thread(s.write_manifest, name, manifest.to_bytes())
    remote = next((x for x in layers if x.media_type == store.REMOTE), None)
    if remote is not None:
        return await _write_config(s, name, layers, {"model_format": store.REMOTE_FORMAT,
                                                    "parent_model": parent})  # fmt: skip
    model = next(x for x in layers if x.media_type == store.MODEL)
    shards = [x.digest for x in layers if x.media_type == store.SHARD]
    try:
        facts = await asyncio.to_thread(s.summary, model.digest, shards)
    except GGUFError:  # a 400; an uploaded file no model uses is not kept
        await asyncio.to_thread(s.remove_unused, [model.digest, *shards])
        raise
    config = {
        "model_format": "gguf",
        "model_family": facts.architecture,
        "model_families": [facts.architecture],
        "model_type": summary.params_label(facts.parameter_count),
        "file_type": facts.quantization,
        "parent_model": parent,
    }
    return await _write_config(s, name, layers, config)


async def _write_config(
    s: Store, name: ModelName, layers: tuple[Layer, ...], fields: dict[str, Any]
) -> StoredModel:
    """Publish a manifest of `layers` with a config blob of `fields` (and the layers' ids)."""
    rootfs = {"type": "layers", "diff_ids": [x.digest for x in layers]}
    config = json.dumps({**fields, "rootfs": rootfs}).encode()
    with s.pinned(x.digest for x in layers):
        digest = await s.add_bytes(config)
        manifest = Manifest(Layer(store.CONFIG_TYPE, digest, len(config)), layers)
        with s.pinned([digest]):
            return await asyncio.to_thread(s.write_manifest, name, manifest.to_bytes())


async def _from(registry: ModelRegistry, s: Store, body: Recipe) -> tuple[Manifest, Layer | None]:
    """The manifest a new model starts from, an uploaded GGUF or folder model (`files`) or a
    model (`from`), and the vision projector among a GGUF's `files` (told by its metadata) if
    one was given."""
    projector = None
    if body.files:
        fmt = folders.detect(list(body.files))
        diffusion = fmt is not None and fmt.name == "diffusion"  # its parts may all be GGUFs
        if diffusion and await asyncio.to_thread(_text_checkpoint, s, body.files):
            fmt, diffusion = None, False  # an LLM uploaded as model.gguf is a text model
        if diffusion or not all(f.lower().endswith(".gguf") for f in body.files):
            if fmt is None or fmt.name == store.SAFETENSORS_FORMAT:
                raise InvalidRequest(
                    "files: give one GGUF file (and a vision projector GGUF if the model has "
                    "one), every file of a split GGUF, a Whisper model's files (model.bin, "
                    "config.json, tokenizer.json, vocabulary.txt) or a Piper voice's "
                    "(<voice>.onnx, <voice>.onnx.json), a diffusion model's parts "
                    "(diffusion_model.gguf, llm.gguf, vae.safetensors...); safetensors import "
                    "is not supported yet",
                    param="files",
                )
            found = {n: _blob(s, d, "files") for n, d in body.files.items()}
            return await _folder_manifest(s, fmt, found), None
        digests = [_blob(s, d, "files") for d in body.files.values()]
        models, projector = await asyncio.to_thread(_projector_apart, s, body.files)
        if models:
            layers = await asyncio.to_thread(_split_layers, s, models)
            return Manifest(layers[0], layers), projector
        if not body.from_:
            s.remove_unused(digests)
            raise InvalidRequest(
                "files: only a vision projector was given; add the model's GGUF, or name the "
                "model in 'from'",
                param="files",
            )
    return await _named_base(registry, s, body), projector


async def _named_base(registry: ModelRegistry, s: Store, body: Recipe) -> Manifest:
    """The manifest of the model `from` names."""
    if not body.from_:
        raise InvalidRequest("neither 'from' nor 'files' was given", param="from")
    if body.from_.startswith(PREFIX):  # a remote endpoint's model: the layer names it
        target = registry.remotes.parse(body.from_, param="from")
        assert target is not None
        data = target.name.encode()
        layer = Layer(store.REMOTE, await s.add_bytes(data), len(data))
        return Manifest(layer, (layer,))
    try:
        name = parse_name(body.from_)
    except InvalidRequest as e:
        raise InvalidRequest(e.message, param="from") from None
    try:
        return await _base(registry, name.display)
    except ModelNotFound:
        raise ModelNotFound(
            f"base model {name.display!r} not found; pull it first", param="from"
        ) from None


def _text_checkpoint(s: Store, files: Mapping[str, str]) -> bool:
    """Whether uploaded `files` named as a diffusion checkpoint hold a GGUF of an architecture
    llama.cpp loads as `model.gguf` (Ollama's clients, and `xllm create` from a folder named
    `model`, name a model so; a vision projector may come beside it)."""
    digest = files.get("model.gguf")
    if digest is None:
        return False
    try:
        header = gguf.read(s.blob_path(_blob(s, digest, "files")))
    except GGUFError:
        return False  # the format it was taken for reports the defect
    return header.architecture in ARCHITECTURES


def _blob(s: Store, digest: str, param: str) -> str:
    digest = parse_digest(digest)
    if not s.has_blob(digest):
        raise InvalidRequest(
            f"{param}: blob {digest} not found; upload it with POST /api/blobs/{digest}",
            param=param,
        )
    return digest


def _projector_apart(s: Store, files: Mapping[str, str]) -> tuple[list[str], Layer | None]:
    """(the model files' digests, the projector's layer) of uploaded `files`: a projector is
    told by its GGUF metadata, whatever its name; at most one may be given."""
    models, projectors = [], []
    for name, digest in files.items():
        path = s.blob_path(parse_digest(digest))
        try:
            header = gguf.read(path)
        except GGUFError as e:
            s.remove_unused(parse_digest(d) for d in files.values())
            raise GGUFError(e.message.replace(path.name, name), param="files") from None
        if mmproj.is_projector(header):
            layer = Layer(store.PROJECTOR, parse_digest(digest), path.stat().st_size)
            projectors.append((name, layer))
        else:
            models.append(parse_digest(digest))
    if len(projectors) > 1:
        s.remove_unused(parse_digest(d) for d in files.values())
        raise InvalidRequest(
            f"files: {projectors[0][0]} and {projectors[1][0]} are both vision projectors; "
            "a model takes one",
            param="files",
        )
    return models, projectors[0][1] if projectors else None


def _split_layers(s: Store, digests: list[str]) -> tuple[Layer, ...]:
    """The model layer and, for the files of a split GGUF, its shards in their own order
    (`split.no`, whatever the client called them); whether they are all of them is checked
    with the model's summary."""
    try:
        order = {d: gguf.read(s.blob_path(d)).metadata.get(gguf.SPLIT_NO, 0) for d in digests}
    except GGUFError:
        s.remove_unused(digests)
        raise
    ranked = sorted(set(digests), key=lambda d: order[d] if isinstance(order[d], int) else -1)
    return tuple(
        Layer(store.SHARD if i else store.MODEL, d, s.blob_path(d).stat().st_size)
        for i, d in enumerate(ranked)
    )


def _check_projector(s: Store, base: Manifest, projector: Layer) -> None:
    """A 400 naming both sizes when the projector does not fit the base model (the uploaded
    projector is then not kept)."""
    model = base.find(store.MODEL)
    assert model is not None, "a GGUF base has a model layer"
    facts = s.summary(model.digest, [x.digest for x in base.all(store.SHARD)])
    try:
        mmproj.check_fits(
            mmproj.read(s.blob_path(projector.digest)), facts.embedding_length, "files", "files"
        )
    except InvalidRequest:
        s.remove_unused([projector.digest])
        raise


def _adapter_layers(s: Store, base: Manifest, files: dict[str, str]) -> list[Layer]:
    """ADAPTER layers for uploaded LoRA files (name -> digest), each checked against the base
    model's tensors; a refused file is not kept."""
    paths = [s.blob_path(x.digest) for x in (*base.all(store.MODEL), *base.all(store.SHARD))]
    model = gguf.read_model(paths)
    layers = []
    for name, d in files.items():
        try:
            adapter.check(gguf.read(s.blob_path(d)), model, name)
        except GGUFError as e:
            s.remove_unused(files.values())
            message = e.message.replace(s.blob_path(d).name, name)
            raise InvalidRequest(f"adapters: {message}", param="adapters") from None
        layers.append(Layer(store.ADAPTER, d, s.blob_path(d).stat().st_size))
    return layers


async def copy(registry: ModelRegistry, source: ModelName, dest: ModelName) -> None:
    """Model `source` under name `dest` too: a stored model's manifest copied, a bundled or
    command-line model's file(s) stored first."""
    s = registry.store
    assert s is not None
    found = registry.find(source.display)
    if found.stored is not None:
        await asyncio.to_thread(s.copy, found.stored.name, dest)
    else:
        manifest = await _base(registry, source.display)
        folder = manifest.format in folders.FORMATS
        await _write_model(
            s, dest, manifest.layers, config_layer=manifest.config if folder else None
        )
    await registry.unload(dest.display)  # a loaded model of that name is now stale


async def create(registry: ModelRegistry, body: Recipe) -> list[str]:
    """Make the model; returns what was done, step by step (Ollama's progress statuses)."""
    name = body.name
    assert registry.store is not None
    s = registry.store
    records = ["gathering model components"]
    base, projector = await _from(registry, s, body)
    if base.format in folders.FORMATS:
        extra = "quantize" if body.quantize else "adapters" if body.adapters else None
        extra = extra or ("template" if body.template is not None else None)
        if extra is not None:
            raise InvalidRequest(f"{extra}: a {base.format} model takes no {extra}", param=extra)
    if base.format == store.REMOTE_FORMAT and (body.quantize or body.adapters):
        param = "quantize" if body.quantize else "adapters"
        raise InvalidRequest(f"{param}: a remote model has no weights here", param=param)
    if body.quantize:
        records.append(f"quantizing model to {body.quantize.upper()}")
        base = await _quantized(s, base, body.quantize)
    texts: dict[str, bytes] = {}
    if body.template is not None:
        if is_go_template(body.template):
            gotemplate.to_jinja(body.template)  # a 400 now for what could not be rendered later
        texts[store.TEMPLATE] = body.template.encode()
    if body.system is not None:
        texts[store.SYSTEM] = body.system.encode()
    if body.parameters:
        params = dict(body.parameters)
        old = base.find(store.PARAMS)
        if old is not None:  # the base's parameters stay unless given anew
            params = {**json.loads(s.blob_path(old.digest).read_bytes()), **params}
        texts[store.PARAMS] = json.dumps(params).encode()
    if body.messages is not None:
        texts[store.MESSAGES] = json.dumps([dict(m) for m in body.messages]).encode()
    licenses = body.license
    replaced = set(texts) | ({store.LICENSE} if licenses is not None else set())
    if projector is not None:  # it replaces the base model's
        replaced.add(store.PROJECTOR)
        await asyncio.to_thread(_check_projector, s, base, projector)
    layers = [x for x in base.layers if x.media_type not in replaced]
    records += [f"using existing layer {x.digest}" for x in layers]
    if projector is not None:
        records.append(f"creating new layer {projector.digest}")
        layers.append(projector)
    if body.adapters:
        known = {x.digest for x in layers}
        wanted = {k: _blob(s, d, "adapters") for k, d in body.adapters.items()}
        for layer in await asyncio.to_thread(_adapter_layers, s, base, wanted):
            if layer.digest not in known:
                known.add(layer.digest)
                records.append(f"creating new layer {layer.digest}")
                layers.append(layer)
    for media, data in [*texts.items(), *((store.LICENSE, t.encode()) for t in licenses or [])]:
        digest = await s.add_bytes(data)
        records.append(f"creating new layer {digest}")
        layers.append(Layer(media, digest, len(data)))
    records.append("writing manifest")
    folder = base.config if base.format in folders.FORMATS else None
    await _write_model(s, name, tuple(layers), body.from_ or "", folder)
    await registry.unload(name.display)  # a loaded model of that name is now stale
    records.append("success")
    return records
