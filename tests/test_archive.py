"""`xllm export` / `import` archives: a round trip, and hostile archives refused whole."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.upstream import sha
from xllm.models import archive
from xllm.models.archive import ArchiveError
from xllm.models.names import parse_name
from xllm.models.store import MODEL, Layer, Manifest, Store


@pytest.fixture
def store(tmp_path: Path, tiny_path: Path) -> Store:
    s = Store(tmp_path / "models")
    digest = asyncio.run(s.add_file(tiny_path))
    template = asyncio.run(s.add_bytes(b"{{ messages }}"))
    config = asyncio.run(s.add_bytes(b"{}"))
    size = tiny_path.stat().st_size
    manifest = Manifest(
        Layer("application/vnd.docker.container.image.v1+json", config, 2),
        (Layer(MODEL, digest, size),
         Layer("application/vnd.ollama.image.template", template, 14)),
    )  # fmt: skip
    s.write_manifest(parse_name("tiny:v1"), manifest.to_bytes())
    return s


def test_round_trip(store: Store, tmp_path: Path) -> None:
    name = parse_name("tiny:v1")
    before = store.get(name)
    assert before is not None
    out = tmp_path / "tiny.tar"
    archive.export(store, name, out)
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert names[:4] == ["xllm-archive.json", "manifest.json", "Modelfile", "metadata.json"]
    assert len(names) == 7  # and three blobs
    other = Store(tmp_path / "other")
    model = archive.import_sync(other, out)
    assert model.name == name and model.digest == before.digest  # same ID
    assert model.modelfile.template == "{{ messages }}"
    renamed = archive.import_sync(other, out, "copy:v2")
    assert renamed.name.display == "copy:v2"
    assert len(list(other.blobs_dir.iterdir())) == 3  # nothing stored twice


def _tar(path: Path, entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tar.addfile(e)
            else:
                info = tarfile.TarInfo(e[0])
                info.size = len(e[1])
                tar.addfile(info, io.BytesIO(e[1]))
    return path


def _link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


INDEX = ("xllm-archive.json", json.dumps({"format": 1, "name": "evil"}).encode())
HEX = "ab" * 32


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([INDEX, ("../../escaped", b"x")], "unexpected entry"),
        ([INDEX, ("/tmp/abs-escaped", b"x")], "unexpected entry"),
        ([INDEX, (f"blobs/../sha256-{HEX}", b"x")], "unexpected entry"),
        ([INDEX, (f"blobs/sha256-{HEX}/../../x", b"x")], "unexpected entry"),
        (
            [INDEX, _link(f"blobs/sha256-{HEX}", tarfile.SYMTYPE, "/etc/passwd")],
            "not a regular file",
        ),
        (
            [INDEX, _link(f"blobs/sha256-{HEX}", tarfile.LNKTYPE, "/etc/passwd")],
            "not a regular file",
        ),
        ([INDEX, _link("manifest.json", tarfile.CHRTYPE, "")], "not a regular file"),
        ([INDEX, (f"blobs/sha256-{HEX}", b"not those bytes")], "digest mismatch"),
        ([INDEX, ("blobs/sha256-" + "AB" * 32, b"x")], "unexpected entry"),
        ([INDEX], "no xllm-archive.json or manifest.json"),
        ([("xllm-archive.json", b"[]"), ("manifest.json", b"{}")], "unknown format"),
    ],
)
def test_hostile_archives_are_refused(
    tmp_path: Path, entries: list[tarfile.TarInfo | tuple[str, bytes]], message: str
) -> None:
    store = Store(tmp_path / "models")
    src = _tar(tmp_path / "evil.tar", entries)
    with pytest.raises(ArchiveError) as e:
        archive.import_sync(store, src)
    assert message in str(e.value)
    outside = {p.name for p in tmp_path.rglob("*")} - {
        "evil.tar",
        "models",
        "blobs",
        "manifests",
        "tmp",
    }
    assert outside == set(), outside
    assert [p for p in store.blobs_dir.glob("*") if p.is_file()] == []
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/abs-escaped").exists()


def test_blobs_of_a_refused_archive_are_removed(store: Store, tmp_path: Path) -> None:
    good = b"GGUF is not this"
    src = _tar(tmp_path / "half.tar", [INDEX, (f"blobs/{sha(good).replace(':', '-')}", good)])
    other = Store(tmp_path / "other")
    with pytest.raises(ArchiveError, match=r"no xllm-archive\.json or manifest\.json"):
        archive.import_sync(other, src)
    assert list(other.blobs_dir.iterdir()) == []


def test_not_a_tar(tmp_path: Path) -> None:
    bad = tmp_path / "x.tar"
    bad.write_bytes(b"hello")
    with pytest.raises(ArchiveError, match="not a readable tar archive"):
        archive.import_sync(Store(tmp_path / "m"), bad)
