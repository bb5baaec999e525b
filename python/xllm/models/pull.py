"""`pull` and `push`: models between the store and the Hub or a registry, as progress records.

The records are Ollama's: `{"status": "pulling manifest"}`, then per blob
`{"status": "pulling <12 hex>", "digest", "total", "completed"}`, `"verifying sha256 digest"`,
`"writing manifest"`, `"success"` (push: `"retrieving manifest"`, `"pushing <12 hex>"`,
`"pushing manifest"`). A failure raises; nothing half-done becomes visible.

Where a name is looked for (SPEC "Models", decision 5): `hf.co/<org>/<repo>` on the Hub;
`<org>/<repo>` on the Hub first, then the registry; `model[:tag]` and names with another host on
the registry.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping

import aiohttp
from yarl import URL

from xllm.config import Settings
from xllm.errors import InsufficientStorage, InvalidRequest, ModelNotFound, RegistryError
from xllm.models import download, projector
from xllm.models.download import Progress
from xllm.models.hub import NotOnHub, hub_remote, part_files
from xllm.models.names import DEFAULT_HOST, DEFAULT_NAMESPACE, ModelName
from xllm.models.remote import Remote, registry_base, registry_remote, repo_url
from xllm.models.store import CHUNK, MANIFEST_TYPE, PROJECTOR, Layer, Manifest, Store

log = logging.getLogger("xllm.pull")

OLLAMA_HOSTS = frozenset({"registry.ollama.ai", "ollama.com", "www.ollama.com"})


def short(digest: str) -> str:
    """The 12 hex digits Ollama shows for a digest."""
    return digest.removeprefix("sha256:")[:12]


async def find_remote(
    http: aiohttp.ClientSession,
    settings: Settings,
    name: ModelName,
    insecure: bool,
    parts: Mapping[str, str] | None = None,
) -> Remote:
    """`parts` (a diffusion model's files by part) are taken from the Hub only."""
    if parts:
        check_parts(name, parts)
        return await hub_remote(settings, name, parts)
    if name.is_hf:
        return await hub_remote(settings, name)
    if name.host == DEFAULT_HOST and name.namespace != DEFAULT_NAMESPACE:
        try:
            return await hub_remote(settings, name)
        except (NotOnHub, RegistryError) as e:
            log.info("%s: not from the Hub (%s); asking the registry", name, e.message)
    return await registry_remote(http, settings, name, insecure)


def check_parts(name: ModelName, parts: Mapping[str, str] | None) -> None:
    """A 400 naming `parts` for parts of a name that is not a Hub repo's, or that are not a
    diffusion model's (before anything is fetched)."""
    if not parts:
        return
    if not (name.is_hf or (name.host == DEFAULT_HOST and name.namespace != DEFAULT_NAMESPACE)):
        raise InvalidRequest(
            f"parts: name the files of a Hugging Face repo (hf.co/<org>/<repo>), not of "
            f"{name.display!r}",
            param="parts",
        )
    part_files(name.repo, parts)


async def pull(
    store: Store,
    settings: Settings,
    name: ModelName,
    insecure: bool = False,
    parts: Mapping[str, str] | None = None,
) -> AsyncGenerator[Progress, None]:
    """Fetch `name` into the store (a Hub repo's diffusion model of the files `parts` names,
    when given); yields progress records, raises XllmError on failure."""
    yield {"status": "pulling manifest"}
    async with download.session() as http:
        remote = await find_remote(http, settings, name, insecure, parts)
        if remote.manifest.format is None:
            raise RegistryError(f"{remote.origin}: the manifest of {name} has no model layer")
        blobs = remote.manifest.blobs()
        need = sum(b.size for b in blobs if not store.has_blob(b.digest, b.size))
        free = store.free_bytes()
        if need > free:
            raise InsufficientStorage(
                f"not enough disk space for {name}: it needs {need} more bytes, "
                f"{free} are free in {store.root}"
            )
        try:
            with store.pinned(b.digest for b in blobs):
                for layer in blobs:
                    async for record in _fetch(http, store, remote, layer):
                        yield record
                yield {"status": "verifying sha256 digest"}
                try:
                    await asyncio.to_thread(_check_files, store, remote.manifest)
                except InvalidRequest as e:  # a malformed file, a projector that does not fit
                    raise RegistryError(
                        f"{remote.origin} sent a model file xllm refuses: {e.message}"
                    ) from None
                yield {"status": "writing manifest"}
                store.write_manifest(name, remote.manifest_bytes)
        except BaseException:
            store.remove_unused(b.digest for b in blobs)
            raise
    yield {"status": "success"}


def _check_files(store: Store, manifest: Manifest) -> None:
    """The model's files are what their layers say: a model xllm reads, and a vision projector
    that is one and fits the model (an InvalidRequest saying why otherwise)."""
    facts = store.summary_of(manifest)
    layer = manifest.find(PROJECTOR)
    if layer is not None:
        found = projector.read(store.blob_path(layer.digest))
        projector.check_fits(found, facts.embedding_length, "the projector", "model")


async def _fetch(
    http: aiohttp.ClientSession, store: Store, remote: Remote, layer: Layer
) -> AsyncGenerator[Progress, None]:
    inline = remote.inline.get(layer.digest)
    if inline is not None:
        await store.add_bytes(inline)
        return
    source = remote.sources[layer.digest]

    def done() -> int:
        progress = store.progress(layer.digest)
        return progress[0] if progress else 0

    work = download.fetch(http, store, layer.digest, layer.size, source.url, source.headers)
    async for record in download.reporting(
        work, f"pulling {short(layer.digest)}", layer.digest, layer.size, done
    ):
        yield record


async def push(
    store: Store, settings: Settings, name: ModelName, insecure: bool = False
) -> AsyncGenerator[Progress, None]:
    """Upload a stored model to its registry (the configured one for names without a host)."""
    model = store.get(name)
    if model is None:
        raise ModelNotFound(f"model {name.display!r} not found", param="model")
    base = registry_base(settings, name, insecure)
    if URL(base).host in OLLAMA_HOSTS:
        raise InvalidRequest(
            f"pushing to {URL(base).host} needs an ollama.com account key, which xllm does not "
            "hold; set XLLM_REGISTRY (models.registry) to a registry you can push to, or name "
            "the model <host>/<namespace>/<model>:<tag>",
            param="model",
        )
    yield {"status": "retrieving manifest"}
    async with download.session() as http:
        for layer in model.manifest.blobs():
            sent = [0]
            work = _push_blob(http, store, base, name, layer, sent)
            async for record in download.reporting(
                work, f"pushing {short(layer.digest)}", layer.digest, layer.size,
                functools.partial(sent.__getitem__, 0),
            ):  # fmt: skip
                yield record
        yield {"status": "pushing manifest"}
        url = f"{repo_url(base, name)}/manifests/{name.tag}"
        raw = store.manifest_path(name).read_bytes()
        async with download.request(
            http, "PUT", url, {"Content-Type": MANIFEST_TYPE}, data=raw
        ) as response:
            if response.status not in (200, 201, 202, 204):
                raise RegistryError(
                    f"push: the registry at {base} refused the manifest (HTTP {response.status})"
                )
    yield {"status": "success"}


async def _push_blob(
    http: aiohttp.ClientSession,
    store: Store,
    base: str,
    name: ModelName,
    layer: Layer,
    sent: list[int],
) -> None:
    repo = repo_url(base, name)
    async with download.request(http, "HEAD", f"{repo}/blobs/{layer.digest}") as response:
        if response.status == 200:
            sent[0] = layer.size
            return
    async with download.request(http, "POST", f"{repo}/blobs/uploads/") as response:
        location = response.headers.get("Location")
        if response.status != 202 or not location:
            raise RegistryError(
                f"push: the registry at {base} refused an upload (HTTP {response.status})"
            )
        upload = response.url.join(URL(location))
    upload = upload.update_query({"digest": layer.digest})
    path = store.blob_path(layer.digest)

    async def body() -> AsyncIterator[bytes]:
        with path.open("rb") as f:
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                sent[0] += len(chunk)
                yield chunk

    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(layer.size)}
    try:
        response = await http.put(upload, data=body(), headers=headers, allow_redirects=False)
    except (aiohttp.ClientError, TimeoutError) as e:
        raise RegistryError(f"push: uploading {layer.digest} failed: {e}") from None
    async with response:
        if response.status not in (200, 201, 204):
            raise RegistryError(
                f"push: the registry at {base} refused {layer.digest} (HTTP {response.status})"
            )
