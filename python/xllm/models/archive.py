"""`xllm export` / `xllm import`: a model as one tar archive, and back into a store.

    xllm-archive.json       {"format": 1, "name": "<model>"}
    manifest.json           the manifest, byte for byte (so the model keeps its ID)
    Modelfile               what `show --modelfile` prints (for people; import ignores it)
    metadata.json           the model's facts (for people; import recomputes them)
    blobs/sha256-<hex>      every blob the manifest names

Import takes nothing on trust (RELIABILITY item 14): only regular-file entries with exactly
those names are accepted (no links, no `..`, no absolute paths: the archive is refused);
each blob is streamed into the store and must hash to its name; the manifest is written last.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import tarfile
from pathlib import Path
from typing import IO

from xllm.errors import InvalidRequest, ModelNotFound
from xllm.models import modelfile
from xllm.models.names import ModelName, parse_name
from xllm.models.store import CHUNK, MAX_MANIFEST, DigestMismatch, Manifest, Store, StoredModel

FORMAT = 1
INDEX = "xllm-archive.json"
_BLOB = re.compile(r"blobs/(sha256-[0-9a-f]{64})")
_SMALL = {INDEX: 1 << 16, "manifest.json": MAX_MANIFEST, "Modelfile": 16 << 20,
          "metadata.json": 16 << 20}  # fmt: skip


class ArchiveError(InvalidRequest):
    """An archive that import refuses."""


def export(store: Store, name: ModelName, dest: Path) -> StoredModel:
    model = store.find(name)
    if model is None:
        raise ModelNotFound(f"model {name.display!r} not found")
    raw = store.manifest_path(name).read_bytes()
    text = modelfile.to_text(model.modelfile, from_=name.display)
    try:
        facts = json.dumps(store.summary_of(model.manifest).to_json(), indent=2).encode()
    except InvalidRequest:
        facts = b"{}"
    index = json.dumps({"format": FORMAT, "name": name.display}).encode()
    tmp = dest.with_name(dest.name + ".partial")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in ((INDEX, index), ("manifest.json", raw), ("Modelfile", text.encode()),
                             ("metadata.json", facts)):  # fmt: skip
            info = tarfile.TarInfo(member)
            info.size = len(data)
            info.mtime = int(model.modified)
            tar.addfile(info, io.BytesIO(data))
        for layer in model.manifest.blobs():
            path = store.blob_path(layer.digest)
            tar.add(path, arcname=f"blobs/{path.name}", recursive=False)
    tmp.replace(dest)
    return model


def _check(member: tarfile.TarInfo) -> None:
    if not member.isreg():
        raise ArchiveError(f"refusing the archive: {member.name!r} is not a regular file")
    if member.name not in _SMALL and not _BLOB.fullmatch(member.name):
        raise ArchiveError(f"refusing the archive: unexpected entry {member.name[:200]!r}")
    limit = _SMALL.get(member.name)
    if limit is not None and member.size > limit:
        raise ArchiveError(f"refusing the archive: {member.name} is too large")


async def _blob(store: Store, digest: str, f: IO[bytes]) -> None:
    async with store.writing(digest) as partial:
        if partial is None:
            return  # the store has it already
        partial.reset()
        try:
            while chunk := f.read(CHUNK):
                partial.write(chunk)
            partial.commit()
        except DigestMismatch as e:
            partial.discard()
            raise ArchiveError(f"refusing the archive: {e.message}") from None
        except BaseException:
            partial.discard()
            raise


async def import_(store: Store, source: Path, name: str | None = None) -> StoredModel:
    """Read an archive made by `export` into `store`; returns the model it holds."""
    small: dict[str, bytes] = {}
    blobs: list[str] = []
    try:
        with tarfile.open(source, "r|*") as tar:  # streamed: one pass, no seeking
            for member in tar:
                _check(member)
                f = tar.extractfile(member)
                assert f is not None  # a regular file
                m = _BLOB.fullmatch(member.name)
                if m is None:
                    small[member.name] = f.read()
                else:
                    digest = m.group(1).replace("-", ":", 1)
                    await _blob(store, digest, f)
                    blobs.append(digest)
    except (tarfile.TarError, EOFError) as e:
        store.remove_unused(blobs)
        raise ArchiveError(f"{source}: not a readable tar archive: {e}") from None
    except BaseException:
        store.remove_unused(blobs)
        raise
    try:
        return _publish(store, small, name)
    except BaseException:
        store.remove_unused(blobs)
        raise


def _publish(store: Store, small: dict[str, bytes], name: str | None) -> StoredModel:
    if INDEX not in small or "manifest.json" not in small:
        raise ArchiveError("refusing the archive: it has no xllm-archive.json or manifest.json")
    try:
        index = json.loads(small[INDEX])
    except ValueError:
        raise ArchiveError(f"refusing the archive: {INDEX} is not JSON") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ArchiveError(f"refusing the archive: unknown format in {INDEX}")
    target = parse_name(name or str(index.get("name", "")))
    raw = small["manifest.json"]
    manifest = Manifest.parse(raw)
    if manifest.format is None:
        raise ArchiveError("refusing the archive: the manifest has no model layer")
    store.summary_of(manifest)  # a malformed model is refused before it becomes one
    return store.write_manifest(target, raw)


def import_sync(store: Store, source: Path, name: str | None = None) -> StoredModel:
    return asyncio.run(import_(store, source, name))
