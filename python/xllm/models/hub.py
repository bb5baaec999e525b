"""Models from the Hugging Face Hub: the GGUF file of a repo that matches the quant tag, or
the files of a safetensors model.

`hf.co/<org>/<repo>[:<quant>]` (and `<org>/<repo>` before the registry is asked) names a repo;
the tag picks the file (`Q4_K_M` when none is given), or the files of a GGUF split into several
(`<name>-00001-of-0000N.gguf`...: the first is the model layer, the rest shard layers), and
the repo's vision projector (`mmproj-*.gguf`) beside it as a projector layer. Their SHA-256
comes from the Hub's LFS metadata, so the bytes are verified like a registry blob; a small
config blob made here records the repo, revision and file. `HF_ENDPOINT` (settings) and
`HF_TOKEN` (read by huggingface_hub) are honoured; the token is sent to the Hub's host only.

A repo without GGUF is a model of a folder format (xllm.models.folders): a Hugging Face model
folder (`*.safetensors` and config.json), a Whisper model in CTranslate2 form (model.bin,
config.json, tokenizer.json, vocabulary: `Systran/faster-whisper-base`), or Piper voices
(`<voice>.onnx` + `.onnx.json`, anywhere in the repo: the tag names one). Every file of it the
format knows becomes a layer. LFS files are verified by their SHA-256 like the GGUF; the small
files the Hub keeps in git have only a git blob id (SHA-1), so they are fetched here, checked
against it, and handed to the pull as inline blobs under their SHA-256: nothing becomes a model
before all verified.

A diffusion model's files are often named freely (`flux-2-klein-4b-Q4_0.gguf`,
`ae.safetensors`) and spread over repos (the text encoder in its own): a pull may name each
part's file (`parts`: `diffusion_model` -> a file of the repo, or `hf.co/<org>/<repo>/<file>`),
and the model is those files under their part names.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp

from xllm.config import Settings
from xllm.engine.llamacpp_archs import ARCHITECTURES
from xllm.errors import Forbidden, InvalidRequest, ModelNotFound, RegistryError
from xllm.models import diffusion, download, folders, gguf
from xllm.models.diffusion import part as part_of
from xllm.models.folders import MODEL_FILE, FolderFormat
from xllm.models.names import DEFAULT_TAG, ModelName, parse_name
from xllm.models.remote import Remote, Source
from xllm.models.store import CONFIG_TYPE, MODEL, PROJECTOR, SHARD, Layer, Manifest, ManifestError

if TYPE_CHECKING:
    from huggingface_hub.hf_api import ModelInfo, RepoSibling

DEFAULT_QUANT = "Q4_K_M"
HF_PREFIX = "hf.co/"
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
MAX_INLINE = 16 << 20
"""Files the Hub keeps in git (no LFS, so no SHA-256) are read into memory up to this."""


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


_PROJECTOR_PREFERENCE = ("F16", "BF16", "Q8_0", "F32")


def choose_projector(files: list[str]) -> str | None:
    """The repo's vision projector (`mmproj-*.gguf`, as the Hub's GGUF repos name them) to
    pull beside a model: the only one, or F16 before BF16, Q8_0, F32 and the others."""
    found = sorted(
        f for f in files if f.endswith(".gguf") and "mmproj" in f.rsplit("/", 1)[-1].lower()
    )
    if not found:
        return None
    rank = {q: i for i, q in enumerate(_PROJECTOR_PREFERENCE)}
    return min(found, key=lambda f: (rank.get(_quant_of(f), len(rank)), f.count("/"), f))


def _model_info(settings: Settings, name: ModelName) -> ModelInfo:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = settings.hf_endpoint
    try:
        return HfApi(endpoint=endpoint).model_info(name.repo, files_metadata=True)
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


def _lfs_layer(sibling: RepoSibling, media: str) -> Layer:
    """The layer of a file the Hub keeps in LFS, by the SHA-256 it gives."""
    lfs = sibling.lfs
    if lfs is None or not lfs.sha256:
        raise RegistryError(
            f"the Hub gives no SHA-256 for {sibling.rfilename}, so it cannot be verified"
        )
    try:
        return Layer.from_json({"mediaType": media, "digest": f"sha256:{lfs.sha256}",
                                "size": lfs.size})  # fmt: skip
    except ManifestError as e:
        raise RegistryError(f"the Hub's metadata for {sibling.rfilename}: {e.message}") from None


def _url(settings: Settings, repo: str, revision: str, filename: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo, filename, revision=revision, endpoint=settings.hf_endpoint)


def _headers() -> dict[str, str]:
    """huggingface_hub's headers: HF_TOKEN's `Authorization` (download.request keeps it to
    the Hub's host)."""
    from huggingface_hub.utils._headers import build_hf_headers

    return build_hf_headers()


def _remote(settings: Settings, name: ModelName, info: ModelInfo) -> Remote:
    """The remote of a GGUF repo (not of a folder format: see `hub_remote`)."""
    siblings = {s.rfilename: s for s in info.siblings or []}
    filenames = choose_files(list(siblings), name.tag, name.repo)
    revision = info.sha or "main"
    endpoint = settings.hf_endpoint
    layers, sources = [], {}
    projector = choose_projector(list(siblings))
    media = [MODEL, *[SHARD] * (len(filenames) - 1), *[PROJECTOR] * (projector is not None)]
    for filename, kind in zip([*filenames, *filter(None, [projector])], media, strict=True):
        layer = _lfs_layer(siblings[filename], kind)
        layers.append(layer)
        sources[layer.digest] = Source(_url(settings, name.repo, revision, filename), _headers())
    source: dict[str, Any] = {
        "hub": endpoint,
        "repo": name.repo,
        "revision": revision,
        "file": filenames[0],
    }
    if len(filenames) > 1:
        source["files"] = filenames
    if projector is not None:
        source["projector"] = projector
    config = {
        "model_format": "gguf",
        "file_type": _quant_of(filenames[0]),
        "rootfs": {"type": "layers", "diff_ids": [x.digest for x in layers]},
        "source": source,
    }
    return _with_config(f"{endpoint}/{name.repo}", config, layers, sources, {})


def _with_config(
    origin: str,
    config: dict[str, Any],
    layers: list[Layer],
    sources: dict[str, Source],
    inline: dict[str, bytes],
) -> Remote:
    """A Hub model as a remote: its layers, and a config blob made here that records them."""
    raw = json.dumps(config).encode()
    config_layer = Layer(CONFIG_TYPE, "sha256:" + hashlib.sha256(raw).hexdigest(), len(raw))
    manifest = Manifest(config_layer, tuple(layers))
    return Remote(
        origin=origin,
        manifest_bytes=manifest.to_bytes(),
        manifest=manifest,
        sources=sources,
        inline={**inline, config_layer.digest: raw},
    )


def _folder_format(files: list[str]) -> FolderFormat | None:
    """A model of a folder format: a diffusion model's parts at the top level (GGUFs among
    them), or, with no GGUF, its top-level files (or, for Piper, a voice anywhere in the tree)
    with the format's weights and what a whole model needs."""
    top = [f for f in files if "/" not in f]
    diffusion = folders.FORMATS["diffusion"]
    parts = [f for f in top if diffusion.is_file(f)]
    if folders.detect(top) is diffusion and diffusion.complete(parts):
        return diffusion
    if any(f.endswith(".gguf") for f in files):
        return None
    voices = {f.rsplit("/", 1)[-1] for f in files if f.endswith(".onnx") and f"{f}.json" in files}
    fmt = folders.FORMATS["piper"] if voices else folders.detect(top)
    if fmt is None or (fmt.name != "piper" and not fmt.complete(top)):
        return None
    return fmt


def git_blob_id(data: bytes) -> str:
    """What git (and the Hub's `blob_id`) names a file's content by."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


async def _folder_remote(
    settings: Settings, name: ModelName, info: ModelInfo, fmt: FolderFormat
) -> Remote:
    """Every file of the model (those its format knows; for Piper, the voice the tag names)
    as a layer."""
    endpoint = settings.hf_endpoint
    revision = info.sha or "main"
    siblings = {s.rfilename: s for s in info.siblings or []}
    chosen = folders.select(fmt, list(siblings), name.tag, name.repo)
    layers: list[Layer] = []
    sources: dict[str, Source] = {}
    inline: dict[str, bytes] = {}
    files: dict[str, str] = {}
    async with download.session() as http:
        for filename, path in sorted(chosen.items()):
            media = fmt.weights if fmt.is_weights(filename) else MODEL_FILE
            url = _url(settings, name.repo, revision, path)
            layer = await _file_layer(http, siblings[path], url, media, sources, inline)
            layers.append(layer)
            files[filename] = layer.digest
    source = {"hub": endpoint, "repo": name.repo, "revision": revision}
    if fmt.name == "piper":
        source["file"] = next(p for n, p in chosen.items() if n.endswith(".onnx"))
    config = {"model_format": fmt.name, "files": files, "source": source}
    return _with_config(f"{endpoint}/{name.repo}", config, layers, sources, inline)


async def _file_layer(
    http: aiohttp.ClientSession,
    sibling: RepoSibling,
    url: str,
    media: str,
    sources: dict[str, Source],
    inline: dict[str, bytes],
) -> Layer:
    """The layer of a repo's file: where an LFS file is fetched from goes in `sources`; a
    small file the Hub keeps in git is fetched now, verified, and put in `inline`."""
    if sibling.lfs is not None:
        layer = _lfs_layer(sibling, media)
        sources[layer.digest] = Source(url, _headers())
        return layer
    data = await _git_file(http, sibling, url)
    layer = Layer(media, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    inline[layer.digest] = data
    return layer


def part_files(repo: str, parts: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """A diffusion model's parts as named on a pull (`diffusion_model` -> `flux-Q4_0.gguf`, a
    file of `repo`, or `hf.co/<org>/<repo>/<path>`, a file of another repo): the file name
    each takes in the model (`diffusion_model.gguf`) -> (repo, path); a 400 naming `parts`
    for parts that are not stable-diffusion.cpp's or do not make a model."""
    wanted: dict[str, tuple[str, str]] = {}
    for role, spec in parts.items():
        if role not in diffusion.PARTS:
            raise InvalidRequest(
                f"parts: {role[:40]!r} is not a part of a diffusion model (one of "
                f"{', '.join(diffusion.PARTS)})",
                param="parts",
            )
        where, path = repo, spec
        if spec.startswith(HF_PREFIX):
            pieces = spec.removeprefix(HF_PREFIX).split("/", 2)
            if len(pieces) < 3 or not all(pieces):
                raise InvalidRequest(
                    f"parts: {role}: expected a file of the repo or hf.co/<org>/<repo>/<file>, "
                    f"got {spec[:200]!r}",
                    param="parts",
                )
            where, path = f"{pieces[0]}/{pieces[1]}", pieces[2]
        ext = path.rsplit(".", 1)[-1].lower()
        if ext not in ("gguf", "safetensors"):
            raise InvalidRequest(
                f"parts: {role}: {path[:200]!r} is neither a .gguf nor a .safetensors file",
                param="parts",
            )
        wanted[f"{role}.{ext}"] = (where, path)
    if not diffusion.complete(wanted):
        raise InvalidRequest(
            "parts: a diffusion model needs model (a whole checkpoint) or diffusion_model, and "
            "takes at most one of each of clip_l, clip_g, t5xxl, llm, vae and taesd",
            param="parts",
        )
    return wanted


async def _parts_remote(
    settings: Settings, name: ModelName, info: ModelInfo, parts: Mapping[str, str]
) -> Remote:
    """A diffusion model of the files a pull names by part, from this repo or others."""
    wanted = part_files(name.repo, parts)
    infos = {name.repo: info}
    for repo in sorted({r for r, _ in wanted.values()} - infos.keys()):
        try:
            other = parse_name(f"{HF_PREFIX}{repo}")
        except InvalidRequest as e:
            raise InvalidRequest(f"parts: {e.message}", param="parts") from None
        infos[repo] = await asyncio.to_thread(_model_info, settings, other)
    fmt = folders.FORMATS["diffusion"]
    layers: list[Layer] = []
    sources: dict[str, Source] = {}
    inline: dict[str, bytes] = {}
    files: dict[str, str] = {}
    origins: dict[str, str] = {}
    async with download.session() as http:
        for filename, (repo, path) in sorted(wanted.items()):
            siblings = {s.rfilename: s for s in infos[repo].siblings or []}
            if path not in siblings:
                raise ModelNotFound(
                    f"parts: {part_of(filename)}: {HF_PREFIX}{repo} has no file {path[:200]!r}",
                    param="parts",
                )
            revision = infos[repo].sha or "main"
            url = _url(settings, repo, revision, path)
            media = fmt.weights if fmt.is_weights(filename) else MODEL_FILE
            layer = await _file_layer(http, siblings[path], url, media, sources, inline)
            layers.append(layer)
            files[filename] = layer.digest
            origins[filename] = f"{repo}/{path}@{revision}"
    source = {"hub": settings.hf_endpoint, "repo": name.repo, "revision": info.sha or "main",
              "parts": origins}  # fmt: skip
    config = {"model_format": fmt.name, "files": files, "source": source}
    return _with_config(f"{settings.hf_endpoint}/{name.repo}", config, layers, sources, inline)


async def _git_file(http: aiohttp.ClientSession, sibling: RepoSibling, url: str) -> bytes:
    """A small file the Hub keeps in git, checked against its git blob id."""
    filename = sibling.rfilename
    if not sibling.blob_id:
        raise RegistryError(f"the Hub gives no blob id for {filename}, so it cannot be verified")
    if sibling.size is not None and sibling.size > MAX_INLINE:
        raise RegistryError(f"{filename} is not in LFS and larger than {MAX_INLINE} bytes")
    headers = {**_headers(), "Accept-Encoding": "identity"}
    async with download.request(http, "GET", url, headers) as response:
        if response.status != 200:
            raise RegistryError(f"fetching {filename} from the Hub: HTTP {response.status}")
        data = await download.read_limited(response, MAX_INLINE, filename)
    if git_blob_id(data) != sibling.blob_id:
        raise RegistryError(
            f"{filename} from the Hub does not match its git blob id {sibling.blob_id}"
        )
    return data


async def hub_remote(
    settings: Settings, name: ModelName, parts: Mapping[str, str] | None = None
) -> Remote:
    """The Hub's GGUF or folder model for `name`, or the diffusion model of the files `parts`
    names (huggingface_hub is synchronous: its calls run in a thread)."""
    info = await asyncio.to_thread(_model_info, settings, name)
    if parts:
        return await _parts_remote(settings, name, info, parts)
    fmt = _folder_format([s.rfilename for s in info.siblings or []])
    if fmt is folders.FORMATS["diffusion"] and await _text_checkpoint(settings, name, info):
        fmt = None
    if fmt is None:
        return await asyncio.to_thread(_remote, settings, name, info)
    return await _folder_remote(settings, name, info, fmt)


HEADER_PREFIX = 1 << 16
"""How much of a GGUF a pull reads ahead to find its architecture (the writers put
`general.architecture` first)."""


async def _text_checkpoint(settings: Settings, name: ModelName, info: ModelInfo) -> bool:
    """Whether a repo taken for a diffusion checkpoint (a top-level `model.gguf` and no
    `config.json`) holds a GGUF of an architecture llama.cpp loads under that name instead:
    its header's first bytes tell (create tells an upload so, from the whole file)."""
    top = [s.rfilename for s in info.siblings or [] if "/" not in s.rfilename]
    if [f for f in top if diffusion.is_file(f)] != ["model.gguf"]:
        return False  # named parts besides it: a diffusion model
    url = _url(settings, name.repo, info.sha or "main", "model.gguf")
    headers = {**_headers(), "Range": f"bytes=0-{HEADER_PREFIX - 1}", "Accept-Encoding": "identity"}
    async with download.session() as http, download.request(http, "GET", url, headers) as r:
        if r.status not in (200, 206):
            raise RegistryError(f"reading model.gguf's header from the Hub: HTTP {r.status}")
        data = b""  # a server that ignores the range sends it all: the rest is left unread
        while len(data) < HEADER_PREFIX and (
            more := await r.content.read(HEADER_PREFIX - len(data))
        ):
            data += more
    return gguf.prefix_architecture(data) in ARCHITECTURES


MAX_CONFIG = 1 << 20


def config_json(settings: Settings, repo: str) -> dict[str, Any]:
    """A repo's config.json, through huggingface_hub's cache (HF_TOKEN honoured; offline, the
    cached copy)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    endpoint = settings.hf_endpoint
    try:
        path = hf_hub_download(repo, "config.json", endpoint=endpoint)
    except HFValidationError as e:  # the Hub's rules for ids: parts of 96, no `..` or `--`
        raise InvalidRequest(
            f"hf: {repo!r} is not a Hugging Face repo id: {str(e).splitlines()[0]}", param="hf"
        ) from None
    except GatedRepoError:
        raise Forbidden(
            f"{repo} is gated on the Hub: accept its terms and set HF_TOKEN", param="hf"
        ) from None
    except RepositoryNotFoundError:
        raise NotOnHub(f"{repo} not found on the Hub at {endpoint}", param="hf") from None
    except LocalEntryNotFoundError:  # before its base class EntryNotFoundError
        raise RegistryError(f"cannot reach the Hub at {endpoint} (and no cached copy)") from None
    except EntryNotFoundError:
        raise NotOnHub(f"{repo} has no config.json on the Hub", param="hf") from None
    except HfHubHTTPError as e:
        raise RegistryError(f"the Hub at {endpoint}: {str(e).splitlines()[0]}") from None
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG + 1)
    try:
        config = json.loads(raw) if len(raw) <= MAX_CONFIG else None
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise RegistryError(f"{repo}'s config.json is not a JSON object of at most 1 MiB")
    return config
