"""Ollama's registry protocol: where a name's manifest and blobs are, and what they are.

    GET  {base}/v2/{namespace}/{model}/manifests/{tag}
    GET  {base}/v2/{namespace}/{model}/blobs/{digest}
    HEAD {base}/v2/{namespace}/{model}/blobs/{digest}              (push: present already?)
    POST {base}/v2/{namespace}/{model}/blobs/uploads/ -> Location  (push: then PUT ?digest=)
    PUT  {base}/v2/{namespace}/{model}/manifests/{tag}

Names without a host use the configured registry (`XLLM_REGISTRY`, default registry.ollama.ai).
Everything a manifest says is checked (`Manifest.parse`) before a byte of a blob is fetched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp

from xllm.config import Settings
from xllm.errors import ModelNotFound, RegistryError
from xllm.models.download import read_limited, request
from xllm.models.names import DEFAULT_HOST, ModelName
from xllm.models.store import MANIFEST_TYPE, MAX_MANIFEST, Manifest, ManifestError

ACCEPT = f"{MANIFEST_TYPE}, application/vnd.oci.image.manifest.v1+json"


@dataclass(frozen=True)
class Source:
    """Where one blob's bytes come from."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Remote:
    """A model found upstream: its manifest, and for each blob where to get it."""

    origin: str
    """For messages: the registry or the Hub repository."""
    manifest_bytes: bytes
    manifest: Manifest
    sources: dict[str, Source] = field(default_factory=dict)
    inline: dict[str, bytes] = field(default_factory=dict)
    """Blobs made or fetched here rather than downloaded by the pull (the config of a Hub model,
    the small git files of a safetensors repo, already checked against their git blob id)."""


def registry_base(settings: Settings, name: ModelName, insecure: bool = False) -> str:
    if name.host == DEFAULT_HOST:
        return settings.registry
    return f"{'http' if insecure else 'https'}://{name.host}"


def repo_url(base: str, name: ModelName) -> str:
    return f"{base}/v2/{name.namespace}/{name.model}"


async def registry_remote(
    http: aiohttp.ClientSession, settings: Settings, name: ModelName, insecure: bool = False
) -> Remote:
    base = registry_base(settings, name, insecure)
    url = f"{repo_url(base, name)}/manifests/{name.tag}"
    headers = {"Accept": ACCEPT, "Accept-Encoding": "identity"}
    async with request(http, "GET", url, headers) as response:
        if response.status == 404:
            raise ModelNotFound(
                f"pull model manifest: {name.display} not found in the registry at {base}",
                param="model",
            )
        if response.status in (401, 403):
            raise RegistryError(
                f"pull model manifest: the registry at {base} refused access to "
                f"{name.display} (HTTP {response.status}); xllm pulls anonymously"
            )
        if response.status != 200:
            raise RegistryError(
                f"pull model manifest: the registry at {base} answered HTTP {response.status}"
            )
        raw = await read_limited(response, MAX_MANIFEST, "the manifest")
    try:
        manifest = Manifest.parse(raw)
    except ManifestError as e:
        raise RegistryError(f"the registry at {base} sent a bad manifest: {e.message}") from None
    blobs = f"{repo_url(base, name)}/blobs/"
    return Remote(
        origin=base,
        manifest_bytes=raw,
        manifest=manifest,
        sources={layer.digest: Source(blobs + layer.digest) for layer in manifest.blobs()},
    )
