"""The model store: content-addressed blobs and manifests, in Ollama's layout.

    <models_dir>/blobs/sha256-<hex>                        one file per content, never twice
    <models_dir>/blobs/sha256-<hex>-partial                a download or upload in progress
    <models_dir>/manifests/<host>/<namespace>/<model>/<tag>  Ollama's manifest JSON
    <models_dir>/metadata/sha256-<hex>.json                the facts of a model blob (GGUF) or
                                                           config blob (folder formats)
    <models_dir>/<format>/<manifest hex>/                  a folder model (safetensors, Whisper,
                                                           a Piper voice) as a folder: its files
                                                           by name, hard links to blobs
    <models_dir>/tmp/                                      files being written, then renamed

A model of a folder format (xllm.models.folders: a Hugging Face safetensors folder, a Whisper
model in CTranslate2 form, a Piper voice) keeps each file as a blob; its config blob records
their names (`{"model_format": "ctranslate2", "files": {"model.bin": "sha256:..."}}`), each of
a shape its format allows, so the folder made of them never leaves the store.

A blob becomes visible (renamed from its partial) only after its SHA-256 matched; a manifest is
written only when every blob it names is present, so an interrupted pull never shows up as a
model. Writers of one blob take an in-process lock and a file lock on its partial (two server
processes may share the directory); partials nobody holds are removed at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xllm.errors import CorruptModel, InsufficientStorage, InvalidRequest, ModelNotFound
from xllm.models import folders, modelfile, summary
from xllm.models.folders import MODEL_FILE as MODEL_FILE  # re-exported: known here too
from xllm.models.folders import SAFETENSORS as SAFETENSORS
from xllm.models.modelfile import Message, Modelfile
from xllm.models.names import ModelName, parse_digest, parse_name
from xllm.models.summary import Summary

log = logging.getLogger("xllm.store")

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
_IMAGE = "application/vnd.ollama.image."
MODEL = _IMAGE + "model"
TEMPLATE = _IMAGE + "template"
SYSTEM = _IMAGE + "system"
PARAMS = _IMAGE + "params"
LICENSE = _IMAGE + "license"
ADAPTER = _IMAGE + "adapter"
MESSAGES = _IMAGE + "messages"
PROJECTOR = _IMAGE + "projector"
SHARD = "application/vnd.xllm.model.shard"
"""The further files of a GGUF split into several, in order after the model layer (the
first file, which holds the metadata). Ollama has no media type for them."""
REMOTE = "application/vnd.xllm.remote"
"""A remote model (`FROM remote:ENDPOINT/model`): its blob is that name, as text."""
GGUF, SAFETENSORS_FORMAT, REMOTE_FORMAT = "gguf", "safetensors", "remote"
MAX_REMOTE_NAME = 1024
MAX_LAYERS = 64
MAX_MANIFEST = 1 << 20
"""Manifests are a few hundred bytes; anything past 1 MiB is refused unread."""
MAX_TEXT_LAYER = 4 << 20
"""Template, system, params, messages and license layers are read into memory up to this."""
MAX_BLOB = 1 << 42
_MEDIA_TYPE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.+-/")
CHUNK = 1 << 20


class ManifestError(InvalidRequest):
    """A manifest that is not what the store accepts."""


class MissingBlob(ManifestError):
    """A stored manifest names a blob that is not in the store whole: absent, or of another
    size than its layer says (a disk that lost it, a copy cut short)."""

    def __init__(self, layer: Layer, path: Path, size: int | None) -> None:
        state = "is missing" if size is None else f"has {size} bytes, not {layer.size}"
        super().__init__(f"its blob {layer.digest} ({path}) {state}")


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    @classmethod
    def from_json(cls, obj: Any) -> Layer:
        if not isinstance(obj, dict):
            raise ManifestError("a layer is not an object")
        media, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
        if (
            not isinstance(media, str)
            or not 0 < len(media) <= 100
            or not set(media) <= _MEDIA_TYPE_CHARS
            or not media.startswith(
                ("application/vnd.ollama.", "application/vnd.docker.", "application/vnd.xllm.")
            )
        ):
            raise ManifestError(f"unsupported layer media type {str(media)[:100]!r}")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_BLOB:
            raise ManifestError(f"layer size {str(size)[:30]!r} is out of range")
        try:
            return cls(media, parse_digest(digest), size)
        except InvalidRequest as e:
            raise ManifestError(f"layer {e.message}") from None


@dataclass(frozen=True)
class Manifest:
    config: Layer
    layers: tuple[Layer, ...]

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "config": self.config.to_json(),
                "layers": [layer.to_json() for layer in self.layers],
            },
            indent=2,
        ).encode()

    @classmethod
    def parse(cls, raw: bytes) -> Manifest:
        """A checked manifest: every digest and size valid, a bounded number of layers."""
        if len(raw) > MAX_MANIFEST:
            raise ManifestError("the manifest is larger than 1 MiB")
        data = _json(raw, "the manifest")
        if not isinstance(data, dict) or data.get("schemaVersion") != 2:
            raise ManifestError("not a schemaVersion 2 manifest")
        layers = data.get("layers")
        if not isinstance(layers, list) or not 0 < len(layers) <= MAX_LAYERS:
            raise ManifestError(f"a manifest needs 1 to {MAX_LAYERS} layers")
        return cls(Layer.from_json(data.get("config")), tuple(Layer.from_json(x) for x in layers))

    def blobs(self) -> list[Layer]:
        """Every distinct blob the manifest needs (config included), each digest once."""
        seen: dict[str, Layer] = {}
        for layer in (self.config, *self.layers):
            seen.setdefault(layer.digest, layer)
        return list(seen.values())

    def find(self, media_type: str) -> Layer | None:
        return next((x for x in self.layers if x.media_type == media_type), None)

    def all(self, media_type: str) -> list[Layer]:
        return [x for x in self.layers if x.media_type == media_type]

    @property
    def size(self) -> int:
        return sum(x.size for x in self.blobs())

    @property
    def format(self) -> str | None:
        """`gguf` (a model layer), a folder format (its weights layers: `safetensors`,
        `ctranslate2`, `piper`), `remote`, or None: no model at all."""
        if self.find(MODEL) is not None:
            return GGUF
        if self.find(REMOTE) is not None:
            return REMOTE_FORMAT
        fmt = folders.by_media(x.media_type for x in self.layers)
        return fmt.name if fmt is not None else None


@dataclass(frozen=True)
class StoredModel:
    """A model in the store, with what its manifest's layers say."""

    name: ModelName
    digest: str
    """sha256:<hex> of the manifest file (the ID `list` shows)."""
    manifest: Manifest
    model_path: Path
    shard_paths: tuple[Path, ...]
    """The further files of a split model, in order (none for one file)."""
    adapter_paths: tuple[Path, ...]
    """LoRA adapters applied over the model's weights."""
    projector_path: Path | None
    """A vision model's projector (its `mmproj` GGUF), when it has one."""
    size: int
    modified: float
    modelfile: Modelfile
    """TEMPLATE, SYSTEM, PARAMETER, MESSAGE, LICENSE and ADAPTER from its layers."""
    format: str = GGUF
    """`gguf`, or a folder format: then `model_path` is its folder (`Store.model_dir` makes
    it)."""
    named_files: tuple[tuple[str, str], ...] = ()
    """A folder model's files: (name in the folder, blob digest)."""
    remote: str | None = None
    """A remote model's `remote:ENDPOINT/model` (then `model_path` is that blob)."""

    @property
    def model_digest(self) -> str:
        layer = self.manifest.find(MODEL)
        assert layer is not None, "only a GGUF model has a model layer"
        return layer.digest

    @property
    def shard_digests(self) -> list[str]:
        return [x.digest for x in self.manifest.all(SHARD)]

    @property
    def files(self) -> list[Path]:
        """The model's GGUF files: the first (metadata) and the shards of a split model."""
        return [self.model_path, *self.shard_paths]


class Partial:
    """A blob being written: `<blob>-partial`, locked, hashed as it grows."""

    def __init__(self, path: Path, final: Path, digest: str, fd: int) -> None:
        self.path, self.final, self.digest, self.fd = path, final, digest, fd
        self.hasher = hashlib.sha256()
        self.written = 0
        self.total = 0
        """What the writer expects in all (progress for those waiting on the same blob)."""

    def resume(self) -> int:
        """Hash what an earlier, interrupted attempt left; returns its length."""
        self.hasher, self.written = hashlib.sha256(), 0
        os.lseek(self.fd, 0, os.SEEK_SET)
        while chunk := os.read(self.fd, CHUNK):
            self.hasher.update(chunk)
            self.written += len(chunk)
        return self.written

    def reset(self) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.hasher, self.written = hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise InsufficientStorage(
                    f"no space left on device while writing {self.digest} to {self.path.parent}"
                ) from None
            raise
        self.hasher.update(data)
        self.written += len(data)

    def commit(self) -> None:
        """Make the blob visible, if and only if its bytes hash to its digest."""
        actual = "sha256:" + self.hasher.hexdigest()
        if actual != self.digest:
            raise DigestMismatch(f"digest mismatch: expected {self.digest}, got {actual}")
        os.fsync(self.fd)
        os.rename(self.path, self.final)
        _fsync_dir(self.final.parent)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class DigestMismatch(InvalidRequest):
    """Bytes that do not hash to the digest they were sent as."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _try_lock(path: Path) -> int | None:
    """An fd of `path` (created if missing) locked exclusively, or None if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # the file may have been renamed or removed between open and lock: then retry
        if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


class Store:
    """The blobs and manifests under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = root / "blobs"
        self.manifests_dir = root / "manifests"
        self.metadata_dir = root / "metadata"
        self.tmp_dir = root / "tmp"
        self._locks: dict[str, asyncio.Lock] = {}
        """One per digest ever written here (a few bytes each; dropping them would race)."""
        self._writing: dict[str, Partial] = {}
        self._pinned: dict[str, int] = {}
        self._models: dict[Path, tuple[tuple[int, int], StoredModel | CorruptModel]] = {}
        self._summaries: dict[str, summary.Summary] = {}

    # --- paths: only ever built from parsed names and digests -------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / parse_digest(digest).replace(":", "-")

    def manifest_path(self, name: ModelName) -> Path:
        return self.manifests_dir.joinpath(*name.parts)

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.blob_path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def _ensure_dirs(self) -> None:
        for d in (self.blobs_dir, self.manifests_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)

    # --- models ------------------------------------------------------------------------------

    def get(self, name: ModelName) -> StoredModel | None:
        """The stored model of that name, or None; a damaged manifest is logged and skipped."""
        model = self._lookup(name)
        return model if isinstance(model, StoredModel) else None

    def find(self, name: ModelName) -> StoredModel | None:
        """The stored model of that name, or None; CorruptModel (the server's 500, naming the
        file) for a manifest that cannot be read or names a blob not there whole. Blobs are
        checked (a stat each) when the manifest is read; one lost later shows at load."""
        model = self._lookup(name)
        if isinstance(model, CorruptModel):
            raise CorruptModel(model.message)  # a new one: the cached one is shared by threads
        return model

    def _lookup(self, name: ModelName) -> StoredModel | CorruptModel | None:
        path = self.manifest_path(name)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        key = (st.st_mtime_ns, st.st_size)
        cached = self._models.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        model: StoredModel | CorruptModel
        try:
            model = self._read(name, path, st.st_mtime)
        except (InvalidRequest, OSError, ValueError) as e:  # said once per version of the file
            reason = getattr(e, "message", None) or str(e)
            log.warning("skipping model %s: %s", name, reason)
            state = "cannot be read" if isinstance(e, OSError) else "is corrupt"
            pull, rm = f"`xllm pull {name.display}`", f"`xllm rm {name.display}`"
            repair = (
                f"remove it with {rm} and download it again with {pull}"
                if isinstance(e, MissingBlob)  # a pull keeps the blobs the store has: rm first
                else f"download the model again with {pull} or remove it with {rm}"
            )
            model = CorruptModel(
                f"the manifest of model {name.display!r} ({path}) {state}: {reason}; {repair}"
            )
        self._models[path] = (key, model)
        return model

    def _read(self, name: ModelName, path: Path, mtime: float) -> StoredModel:
        raw = _read_limited(path, MAX_MANIFEST)
        manifest = Manifest.parse(raw)
        for layer in manifest.blobs():  # a stat each: a lost or cut blob shows before any load
            self._check_blob(layer)
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        model_layer = manifest.find(MODEL)
        projector = manifest.find(PROJECTOR)
        remote_layer = manifest.find(REMOTE)
        named: tuple[tuple[str, str], ...] = ()
        remote = None
        if model_layer is not None:
            model_path = self.blob_path(model_layer.digest)
        elif manifest.format in folders.FORMATS:
            named = tuple(self.named_files(manifest).items())
            model_path = self.view_path(digest, manifest.format)
        elif remote_layer is not None:
            model_path = self.blob_path(remote_layer.digest)
            remote = _read_limited(model_path, MAX_REMOTE_NAME).decode("utf-8", "replace")
        else:
            raise ManifestError("the manifest has no model layer")
        return StoredModel(
            name=name,
            digest=digest,
            manifest=manifest,
            model_path=model_path,
            shard_paths=tuple(self.blob_path(x.digest) for x in manifest.all(SHARD)),
            adapter_paths=tuple(self.blob_path(x.digest) for x in manifest.all(ADAPTER)),
            projector_path=self.blob_path(projector.digest) if projector is not None else None,
            size=manifest.size,
            modified=mtime,
            modelfile=self._modelfile(manifest),
            format=manifest.format or GGUF,
            named_files=named,
            remote=remote,
        )

    def _check_blob(self, layer: Layer) -> None:
        path = self.blob_path(layer.digest)
        try:
            size: int | None = path.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            size = None
        if size != layer.size:
            raise MissingBlob(layer, path, size)

    def named_files(self, manifest: Manifest) -> dict[str, str]:
        """A folder model's files (name -> digest) from its config blob, checked: every name
        one its format may hold, every file one of the manifest's layers and back, and the
        set whole."""
        fmt = folders.FORMATS.get(manifest.format or "")
        if fmt is None:
            raise ManifestError("the manifest is not of a folder format")
        config = _json(_read_limited(self.blob_path(manifest.config.digest), MAX_MANIFEST),
                       "the config blob")  # fmt: skip
        files = config.get("files") if isinstance(config, dict) else None
        if not isinstance(files, dict):
            raise ManifestError(f"the config blob of a {fmt.name} model lists no files")
        layers = {x.digest for x in manifest.layers if x.media_type in (fmt.weights, MODEL_FILE)}
        out: dict[str, str] = {}
        for name, digest in files.items():
            if not isinstance(name, str) or not fmt.is_file(name):
                raise ManifestError(
                    f"{str(name)[:100]!r} is not a file a model folder holds ({fmt.name})"
                )
            if not isinstance(digest, str) or digest not in layers:
                raise ManifestError(f"{name} names no layer of the manifest")
            out[name] = digest
        if set(out.values()) != layers or not fmt.complete(out):
            raise ManifestError("the config blob's files do not match the manifest's layers")
        return out

    def view_path(self, manifest_digest: str, fmt: str = SAFETENSORS_FORMAT) -> Path:
        assert fmt in folders.FORMATS, fmt  # a fixed name: the path stays under the store
        return self.root / fmt / parse_digest(manifest_digest).removeprefix("sha256:")

    def model_dir(self, model: StoredModel) -> Path:
        """A folder model as the folder an engine loads: its files under their names, hard
        links to the blobs (symlinks where the filesystem has none), made once, whole."""
        final = self.view_path(model.digest, model.format)
        if final.is_dir():
            return final
        self._ensure_dirs()
        tmp = self.tmp_dir / f"{os.getpid()}-{secrets.token_hex(8)}"
        try:
            for name, digest in model.named_files:
                dest = tmp / name  # names are checked (is_model_file): no `..`, no absolute path
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(self.blob_path(digest), dest)
                except OSError:  # no hard links here (another filesystem, a FAT volume...)
                    os.symlink(self.blob_path(digest), dest)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.is_dir():  # another process made it meanwhile: that is fine
                raise
        return final

    def _text(self, layer: Layer) -> str:
        return _read_limited(self.blob_path(layer.digest), MAX_TEXT_LAYER).decode("utf-8")

    def _modelfile(self, manifest: Manifest) -> Modelfile:
        params: dict[str, Any] = {}
        messages: list[Message] = []
        template = system = None
        licenses, adapters = [], []
        for layer in manifest.layers:
            if layer.media_type == TEMPLATE:
                template = self._text(layer)
            elif layer.media_type == SYSTEM:
                system = self._text(layer)
            elif layer.media_type == LICENSE:
                licenses.append(self._text(layer))
            elif layer.media_type == ADAPTER:
                adapters.append(layer.digest)
            elif layer.media_type == PARAMS:
                raw = _json(self._text(layer), "the params layer")
                if not isinstance(raw, dict):
                    raise ManifestError("the params layer is not a JSON object")
                params = modelfile.parameters(raw)
            elif layer.media_type == MESSAGES:
                raw = _json(self._text(layer), "the messages layer")
                if not isinstance(raw, list) or not all(
                    isinstance(m, dict) and "role" in m and "content" in m for m in raw
                ):
                    raise ManifestError("the messages layer is not a list of {role, content}")
                messages = [Message(str(m["role"]), str(m["content"])) for m in raw]
        return Modelfile(
            parameters=params,
            template=template,
            system=system,
            messages=tuple(messages),
            adapters=tuple(adapters),
            license=tuple(licenses),
        )

    def list(self) -> list[StoredModel]:
        """Every stored model, by name."""
        found = []
        for path in _files(self.manifests_dir, depth=4):
            rel = path.relative_to(self.manifests_dir).parts
            try:
                name = parse_name(f"{rel[0]}/{rel[1]}/{rel[2]}:{rel[3]}")
            except InvalidRequest:
                continue
            if name.parts != rel:  # e.g. huggingface.co/... written by hand
                continue
            model = self.get(name)
            if model is not None:
                found.append(model)
        return sorted(found, key=lambda m: m.name.display)

    def write_manifest(self, name: ModelName, raw: bytes) -> StoredModel:
        """Publish a model: every blob must be present; the manifest appears atomically."""
        manifest = Manifest.parse(raw)
        if manifest.format is None:
            raise ManifestError("the manifest has no model layer")
        for layer in manifest.blobs():
            if not self.has_blob(layer.digest, layer.size):
                raise ManifestError(f"blob {layer.digest} is missing or has the wrong size")
        if manifest.format in folders.FORMATS:
            self.named_files(manifest)  # refused before it becomes a model
        path = self.manifest_path(name)
        old = self.get(name)
        self._write_file(path, raw)
        model = self.get(name)
        if model is None:
            raise ManifestError(f"the manifest of {name} could not be read back")
        if old is not None and old.digest != model.digest:  # replaced: its folder may go
            self._drop_view(old)
        return model

    def _write_file(self, path: Path, data: bytes) -> None:
        self._ensure_dirs()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"{os.getpid()}-{secrets.token_hex(8)}"
        try:
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                raise InsufficientStorage(f"no space left on device in {self.root}") from None
            raise
        _fsync_dir(path.parent)

    def copy(self, source: ModelName, dest: ModelName) -> StoredModel:
        if self.find(source) is None:
            raise ModelNotFound(f"model {source.display!r} not found", param="source")
        return self.write_manifest(dest, _read_limited(self.manifest_path(source), MAX_MANIFEST))

    def delete(self, name: ModelName) -> bool:
        """Remove a model's manifest and the blobs no other model uses; False if absent. A
        damaged model goes too, with those blobs its manifest still names (`xllm rm` is the
        repair its error gives)."""
        model = self.get(name)
        path = self.manifest_path(name)
        blobs = model.manifest.blobs() if model is not None else _blobs_named(path)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return False
        self._models.pop(path, None)
        for parent in list(path.parents)[:3]:
            with contextlib.suppress(OSError):
                parent.rmdir()  # only when empty
        if model is not None:
            self._drop_view(model)
        self.remove_unused(layer.digest for layer in blobs)
        return True

    def _drop_view(self, model: StoredModel) -> None:
        """Remove a folder model's folder once no model of the same manifest (a copy) is
        left."""
        if model.format in folders.FORMATS and all(m.digest != model.digest for m in self.list()):
            shutil.rmtree(self.view_path(model.digest, model.format), ignore_errors=True)

    def remove_unused(self, digests: Iterable[str]) -> int:
        """Remove those of `digests` no manifest references and no pull or create holds."""
        candidates = set(digests) - set(self._pinned)
        if not candidates:
            return 0
        used = {layer.digest for m in self.list() for layer in m.manifest.blobs()}
        removed = 0
        for digest in candidates - used:
            name = digest.replace(":", "-")
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(digest).unlink()
                removed += 1
            (self.metadata_dir / f"{name}.json").unlink(missing_ok=True)
            self._summaries.pop(digest, None)
        return removed

    @contextlib.contextmanager
    def pinned(self, digests: Iterable[str]) -> Iterator[None]:
        """Keep these blobs from garbage collection while a model is being assembled."""
        held = list(digests)
        for d in held:
            self._pinned[d] = self._pinned.get(d, 0) + 1
        try:
            yield
        finally:
            for d in held:
                self._pinned[d] -= 1
                if not self._pinned[d]:
                    del self._pinned[d]

    # --- blobs -------------------------------------------------------------------------------

    def prune(self) -> int:
        """At start: remove partials no process is writing, and stale temporary files."""
        removed = 0
        for path in _files(self.blobs_dir, depth=1):
            if path.name.endswith("-partial"):
                fd = _try_lock(path)
                if fd is not None:
                    path.unlink(missing_ok=True)
                    os.close(fd)
                    removed += 1
        for path in _files(self.tmp_dir, depth=1):
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > 3600:
                    path.unlink()
        for path in _dirs(self.tmp_dir):  # a model folder whose making was interrupted
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > 3600:
                    shutil.rmtree(path)
        if removed:
            log.info("removed %d partial download(s) from %s", removed, self.blobs_dir)
        return removed

    def progress(self, digest: str) -> tuple[int, int] | None:
        """(written, total) of a blob this process is writing right now."""
        partial = self._writing.get(digest)
        return (partial.written, partial.total) if partial else None

    @contextlib.asynccontextmanager
    async def writing(self, digest: str) -> AsyncIterator[Partial | None]:
        """The locked partial for `digest`, or None when the blob is (or became) present.

        One writer per blob: in this process through an asyncio lock, across processes through
        a file lock on the partial. Leaving the block without `commit()` keeps the partial for a
        resumed retry; `discard()` drops it.
        """
        final = self.blob_path(digest)
        async with self._locks.setdefault(digest, asyncio.Lock()):
            if final.exists():
                yield None
                return
            self._ensure_dirs()
            path = final.with_name(final.name + "-partial")
            while True:
                fd = await asyncio.to_thread(_try_lock, path)
                if fd is not None:
                    break
                await asyncio.sleep(0.1)  # another process is writing it: poll its lock
            try:
                if final.exists():  # the other process finished it: drop our empty partial
                    path.unlink(missing_ok=True)
                    yield None
                    return
                partial = Partial(path, final, digest, fd)
                self._writing[digest] = partial
                try:
                    yield partial
                finally:
                    self._writing.pop(digest, None)
            finally:
                os.close(fd)

    async def add_bytes(self, data: bytes) -> str:
        """Store a small blob (template, params, config...); returns its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        async with self.writing(digest) as partial:
            if partial is not None:
                partial.reset()
                partial.write(data)
                partial.commit()
        return digest

    async def add_file(self, source: Path) -> str:
        """Copy a local file into the store (hashed on the way); returns its digest."""
        digest = "sha256:" + await asyncio.to_thread(file_sha256, source)
        async with self.writing(digest) as partial:
            if partial is not None:
                partial.reset()
                await asyncio.to_thread(_copy_into, source, partial)
                try:
                    partial.commit()
                except DigestMismatch:
                    partial.discard()
                    raise
        return digest

    # --- metadata ----------------------------------------------------------------------------

    def summary(self, digest: str, shards: Iterable[str] = ()) -> summary.Summary:
        """The GGUF facts of model blob `digest` (with the `shards` of a split model, in
        order), read once and kept beside the blobs.

        GGUFError (a 400) for a blob that is not a well-formed GGUF.
        """
        files = [self.blob_path(d) for d in (digest, *shards)]
        return self._summary(digest, lambda: summary.summarize(files))

    def summary_of(self, manifest: Manifest) -> Summary:
        """The facts of a manifest's model, whatever its format: a GGUF model's (`summary`),
        or a folder model's, kept under its config blob (which names all its files).

        GGUFError, SafetensorsError or SpeechModelError (400s) for files that are not what
        they claim.
        """
        fmt = folders.FORMATS.get(manifest.format or "")
        if fmt is None:
            model = manifest.find(MODEL)
            if model is None:
                raise ManifestError("the manifest has no model layer")
            return self.summary(model.digest, [x.digest for x in manifest.all(SHARD)])
        files = {n: self.blob_path(d) for n, d in self.named_files(manifest).items()}
        return self._summary(manifest.config.digest, lambda: fmt.summarize(files))

    def _summary(self, digest: str, compute: Callable[[], Summary]) -> Summary:
        digest = parse_digest(digest)
        facts = self._summaries.get(digest)
        if facts is not None:
            return facts
        path = self.metadata_dir / (digest.replace(":", "-") + ".json")
        with contextlib.suppress(OSError, ValueError):
            facts = summary.Summary.from_json(json.loads(path.read_bytes()))
        if facts is None:
            facts = compute()
            with contextlib.suppress(OSError):
                self.metadata_dir.mkdir(parents=True, exist_ok=True)
                self._write_file(path, json.dumps(facts.to_json()).encode())
        self._summaries[digest] = facts
        return facts

    def verify(self, digests: Iterable[str]) -> str | None:
        """The first of blobs `digests` that no longer hashes to its name (a full read of each
        file), or None when all do."""
        for digest in digests:
            try:
                if "sha256:" + file_sha256(self.blob_path(digest)) != parse_digest(digest):
                    return digest
            except OSError:
                return digest
        return None

    def free_bytes(self) -> int:
        self._ensure_dirs()
        return shutil.disk_usage(self.blobs_dir).free


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _copy_into(source: Path, partial: Partial) -> None:
    with source.open("rb") as f:
        while chunk := f.read(CHUNK):
            partial.write(chunk)


def _json(raw: bytes | str, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise ManifestError(f"{what} is not valid JSON") from None


def _blobs_named(path: Path) -> list[Layer]:
    """The blobs of the manifest at `path`, or none when it cannot be read."""
    try:
        return Manifest.parse(_read_limited(path, MAX_MANIFEST)).blobs()
    except (ManifestError, OSError):
        return []


def _read_limited(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ManifestError(f"{path.name} is larger than {limit} bytes")
    return data


def _dirs(root: Path) -> Iterator[Path]:
    """Directories right under `root` (not symlinks to them)."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(root):
            if entry.is_dir(follow_symlinks=False):
                yield Path(entry.path)


def _files(root: Path, depth: int) -> Iterator[Path]:
    """Regular files exactly `depth` levels under `root`; symlinks are never followed."""
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.is_symlink():
            continue
        if depth == 1 and entry.is_file(follow_symlinks=False):
            yield Path(entry.path)
        elif depth > 1 and entry.is_dir(follow_symlinks=False):
            yield from _files(Path(entry.path), depth - 1)
