"""The store's rules: manifests only over present blobs, shared blobs outlive one model, damaged
or hand-placed files never become models, and the Modelfile layers read back."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import pytest

from xllm.models import store as st
from xllm.models.modelfile import Message
from xllm.models.names import parse_name
from xllm.models.store import Layer, Manifest, ManifestError, Store


def _model(s: Store, tiny: Path, name: str, *extra: tuple[str, bytes]) -> Manifest:
    digest = asyncio.run(s.add_file(tiny))
    layers = [Layer(st.MODEL, digest, tiny.stat().st_size)]
    for media, data in extra:
        layers.append(Layer(media, asyncio.run(s.add_bytes(data)), len(data)))
    config = asyncio.run(s.add_bytes(name.encode()))
    manifest = Manifest(Layer(st.CONFIG_TYPE, config, len(name)), tuple(layers))
    s.write_manifest(parse_name(name), manifest.to_bytes())
    return manifest


def test_modelfile_layers_read_back(tmp_path: Path, tiny_path: Path) -> None:
    s = Store(tmp_path)
    _model(
        s, tiny_path, "m:v1",
        (st.TEMPLATE, b"{{ messages }}"), (st.SYSTEM, b"be brief"),
        (st.PARAMS, json.dumps({"temperature": 0.5, "stop": ["x"]}).encode()),
        (st.MESSAGES, json.dumps([{"role": "user", "content": "hi"}]).encode()),
        (st.LICENSE, b"MIT"), (st.LICENSE, b"Apache"),
    )  # fmt: skip
    m = s.get(parse_name("m:v1"))
    assert m is not None
    mf = m.modelfile
    assert (mf.template, mf.system, mf.license) == ("{{ messages }}", "be brief", ("MIT", "Apache"))
    assert mf.parameters == {"temperature": 0.5, "stop": ["x"]}
    assert mf.messages == (Message("user", "hi"),)
    assert m.model_path.read_bytes() == tiny_path.read_bytes()
    assert m.size == sum(x.size for x in m.manifest.blobs())


def test_a_manifest_needs_its_blobs(tmp_path: Path) -> None:
    s = Store(tmp_path)
    layer = Layer(st.MODEL, "sha256:" + "a" * 64, 5)
    with pytest.raises(ManifestError, match="missing"):
        s.write_manifest(parse_name("x"), Manifest(layer, (layer,)).to_bytes())
    assert s.list() == []


def test_delete_keeps_shared_blobs(tmp_path: Path, tiny_path: Path) -> None:
    s = Store(tmp_path)
    _model(s, tiny_path, "a", (st.SYSTEM, b"only a"))
    _model(s, tiny_path, "b")
    digest = "sha256:" + st.file_sha256(tiny_path)
    assert s.delete(parse_name("a"))
    assert s.has_blob(digest)  # b still uses it
    assert not s.has_blob("sha256:" + hashlib.sha256(b"only a").hexdigest())
    assert not s.delete(parse_name("a"))
    with s.pinned([digest]):
        assert s.delete(parse_name("b"))
        assert s.has_blob(digest)  # a pull or create holds it
    assert s.remove_unused([digest]) == 1 and not s.has_blob(digest)
    assert not (tmp_path / "manifests" / "registry.ollama.ai").exists()  # empty dirs go too


def test_damaged_and_hand_placed_manifests_are_skipped(tmp_path: Path, tiny_path: Path) -> None:
    s = Store(tmp_path)
    _model(s, tiny_path, "good")
    lib = tmp_path / "manifests" / "registry.ollama.ai" / "library"
    (lib / "broken").mkdir()
    (lib / "broken" / "latest").write_text("{not json")
    (lib / "..weird").mkdir()
    (lib / "..weird" / "latest").write_bytes((lib / "good" / "latest").read_bytes())
    (lib / "linked").mkdir()
    os.symlink(lib / "good" / "latest", lib / "linked" / "latest")
    (tmp_path / "manifests" / "huggingface.co" / "o" / "r").mkdir(parents=True)
    (tmp_path / "manifests" / "huggingface.co" / "o" / "r" / "latest").write_bytes(b"{}")
    assert [m.name.display for m in s.list()] == ["good:latest"]


def test_summary_is_cached_on_disk(tmp_path: Path, tiny_path: Path) -> None:
    s = Store(tmp_path)
    manifest = _model(s, tiny_path, "m")
    digest = manifest.layers[0].digest
    facts = s.summary(digest)
    cached = tmp_path / "metadata" / f"{digest.replace(':', '-')}.json"
    assert json.loads(cached.read_text())["architecture"] == facts.architecture == "llama"
    assert Store(tmp_path).summary(digest) == facts  # read back, not recomputed


def test_verify_detects_bit_rot(tmp_path: Path, tiny_path: Path) -> None:
    s = Store(tmp_path)
    digest = _model(s, tiny_path, "m").layers[0].digest
    assert s.verify([digest]) is None
    path = s.blob_path(digest)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    assert s.verify([digest]) == digest
