"""Models from the Hugging Face Hub: the GGUF file of a repo that matches the quant tag.

`hf.co/<org>/<repo>[:<quant>]` (and `<org>/<repo>` before the registry is asked) names a repo;
the tag picks the file (`Q4_K_M` when none is given), or the files of a GGUF split into several
(`<name>-00001-of-0000N.gguf`...: the first is the model layer, the rest shard layers). Their
SHA-256 comes from the Hub's LFS metadata, so the bytes are verified like a registry blob; a
small config blob made here records the repo, revision and file. `HF_ENDPOINT` (settings) and
`HF_TOKEN` (read by huggingface_hub) are honoured; the token is sent to the Hub's host only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from typing import Any

from xllm.config import Settings
from xllm.errors import ModelNotFound, RegistryError
from xllm.models.names import DEFAULT_TAG, ModelName
from xllm.models.remote import Remote, Source
from xllm.models.store import CONFIG_TYPE, MODEL, SHARD, Layer, Manifest, ManifestError

DEFAULT_QUANT = "Q4_K_M"
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


class NotOnHub(ModelNotFound):
    """The Hub has no such repo, or no GGUF in it (the registry may still have the name)."""


def _quant_of(filename: str) -> str:
    stem = _SPLIT.sub("", filename.rsplit("/", 1)[-1]).removesuffix(".gguf")
    m = re.search(r"(?:^|[-._])((?:I?Q\d|F16|BF16|F32|TQ\d|MXFP4)[A-Za-z0-9_]*)$", stem, re.I)
    return m.group(1).upper() if m else stem


def choose_files(files: list[str], tag: str, repo: str) -> list[str]:
    """The GGUF in `files` for quant `tag` (`latest`: Q4_K_M, or the only one); every file of
    it, in order, when it is split into several."""
    ggufs = sorted(
        f for f in files if f.endswith(".gguf") and "mmproj" not in f.rsplit("/", 1)[-1].lower()
    )
    if not ggufs:
        raise NotOnHub(f"{repo} has no GGUF files on the Hub", param="model")
    wanted = DEFAULT_QUANT if tag == DEFAULT_TAG else tag.upper()
    matches = [f for f in ggufs if _quant_of(f) == wanted]
    models = {_SPLIT.sub("", f) for f in ggufs}
    if not matches and tag == DEFAULT_TAG and len(models) == 1:
        matches = ggufs
    if not matches:
        quants = ", ".join(sorted({_quant_of(f) for f in ggufs}))
        raise ModelNotFound(
            f"{repo} has no {wanted} GGUF; available: {quants} (pull hf.co/{repo}:<quant>)",
            param="model",
        )
    chosen = min(matches, key=lambda f: (f.count("/"), len(f), f))
    split = _SPLIT.search(chosen)
    if split is None:
        return [chosen]
    n, prefix = int(split.group(2)), chosen[: split.start()]
    shards = [f"{prefix}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    missing = [f for f in shards if f not in files]
    if missing:
        raise RegistryError(f"{repo}: the split GGUF {chosen} lacks {', '.join(missing)}")
    return shards


def _hub_remote(settings: Settings, name: ModelName) -> Remote:
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils._headers import build_hf_headers

    endpoint = settings.hf_endpoint
    try:
        info = HfApi(endpoint=endpoint).model_info(name.repo, files_metadata=True)
    except GatedRepoError:
        raise RegistryError(
            f"{name.repo} is gated on the Hub: accept its terms and set HF_TOKEN"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise NotOnHub(f"{name.repo} not found on the Hub at {endpoint}", param="model") from None
    except HfHubHTTPError as e:
        raise RegistryError(f"the Hub at {endpoint}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # httpx's connection errors and the like
        raise RegistryError(f"cannot reach the Hub at {endpoint}: {e}") from None
    siblings = {s.rfilename: s for s in info.siblings or []}
    filenames = choose_files(list(siblings), name.tag, name.repo)
    revision = info.sha or "main"
    layers, sources = [], {}
    for i, filename in enumerate(filenames):
        lfs = siblings[filename].lfs
        if lfs is None or not lfs.sha256:
            raise RegistryError(
                f"the Hub gives no SHA-256 for {filename}, so it cannot be verified"
            )
        media = MODEL if i == 0 else SHARD
        try:
            layer = Layer.from_json({"mediaType": media, "digest": f"sha256:{lfs.sha256}",
                                     "size": lfs.size})  # fmt: skip
        except ManifestError as e:
            raise RegistryError(f"the Hub's metadata for {filename}: {e.message}") from None
        layers.append(layer)
        url = hf_hub_url(name.repo, filename, revision=revision, endpoint=endpoint)
        sources[layer.digest] = Source(url, build_hf_headers())
    source: dict[str, Any] = {
        "hub": endpoint,
        "repo": name.repo,
        "revision": revision,
        "file": filenames[0],
    }
    if len(filenames) > 1:
        source["files"] = filenames
    config = json.dumps(
        {
            "model_format": "gguf",
            "file_type": _quant_of(filenames[0]),
            "rootfs": {"type": "layers", "diff_ids": [x.digest for x in layers]},
            "source": source,
        }
    ).encode()
    config_layer = Layer(CONFIG_TYPE, "sha256:" + hashlib.sha256(config).hexdigest(), len(config))
    manifest = Manifest(config_layer, tuple(layers))
    return Remote(
        origin=f"{endpoint}/{name.repo}",
        manifest_bytes=manifest.to_bytes(),
        manifest=manifest,
        sources=sources,
        inline={config_layer.digest: config},
    )


async def hub_remote(settings: Settings, name: ModelName) -> Remote:
    """The Hub's GGUF for `name` (huggingface_hub is synchronous: it runs in a thread)."""
    return await asyncio.to_thread(_hub_remote, settings, name)
