"""The store's rules: manifests only over present blobs, shared blobs outlive one model, damaged
or hand-placed files never become models, and the Modelfile layers read back."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from xllm.errors import CorruptModel
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


def _place(s: Store, name: str, model: bytes, *extra: tuple[str, bytes]) -> Manifest:
    """A manifest written as it is, unchecked (as a damaged disk or a hand leaves one)."""
    layers = [Layer(st.MODEL, asyncio.run(s.add_bytes(model)), len(model))]
    layers += [Layer(m, asyncio.run(s.add_bytes(data)), len(data)) for m, data in extra]
    config = asyncio.run(s.add_bytes(name.encode()))
    manifest = Manifest(Layer(st.CONFIG_TYPE, config, len(name)), tuple(layers))
    path = s.manifest_path(parse_name(name))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(manifest.to_bytes())
    return manifest


Damage = Callable[[Store, Manifest], str]
"""Damages the model `bad` (model, system and messages layers); returns what its error says."""


def _rewrite(text: str, says: str) -> Damage:
    def damage(s: Store, m: Manifest) -> str:
        s.manifest_path(parse_name("bad")).write_text(text)
        return says

    return damage


def _blob(index: int, keep: int | None = None, data: bytes = b"") -> Damage:
    """The blob of layer `index` removed, cut to its first `keep` bytes, or overwritten."""

    def damage(s: Store, m: Manifest) -> str:
        layer = m.layers[index]
        path = s.blob_path(layer.digest)
        if data:
            path.write_bytes(data)
            return ""
        if keep is None:
            path.unlink()
            return f"its blob {layer.digest} ({path}) is missing; remove it with `xllm rm"
        path.write_bytes(path.read_bytes()[:keep])
        return f"its blob {layer.digest} ({path}) has {keep} bytes, not {layer.size}; remove"

    return damage


MESSAGES = b'[{"role": "user", "content": "hi"}]'
DAMAGES: dict[str, tuple[Damage, str, bool]] = {
    # name: (damage, what the error says, whether the manifest still tells its blobs)
    "torn write": (_rewrite('{"schemaVersion": 2, "layers": [', ""), "not valid JSON", False),
    "nested thousands deep": (_rewrite("[" * 100_000, ""), "not valid JSON", False),
    "no layers": (
        _rewrite('{"schemaVersion": 2, "config": {}, "layers": []}', ""),
        "1 to 64 layers",
        False,
    ),
    "model blob lost": (_blob(0), "", True),
    "model blob cut short": (_blob(0, keep=10), "", True),
    "system blob lost": (_blob(1), "", True),
    "messages rotted": (
        _blob(2, data=MESSAGES.replace(b"content", b"kontent")),
        "the messages layer is not a list of {role, content}",
        True,
    ),
}


@pytest.mark.parametrize(("damage", "says", "parses"), DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_model_is_the_servers_error_and_the_others_still_list(
    tmp_path: Path,
    tiny_path: Path,
    damage: Damage,
    says: str,
    parses: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = Store(tmp_path)
    _model(s, tiny_path, "good")
    extra = ((st.SYSTEM, b"only bad"), (st.MESSAGES, MESSAGES))
    manifest = _place(s, "bad", b"GGUF" + b"\1" * 60, *extra)
    assert s.find(parse_name("bad")) is not None
    says = damage(s, manifest) or says
    s = Store(tmp_path)  # as a server (re)started over the damaged store reads it
    name = parse_name("bad")
    with caplog.at_level(logging.WARNING, logger="xllm.store"):
        assert [m.name.display for m in s.list()] == ["good:latest"]
    assert "skipping model bad:latest: " in caplog.text
    assert s.get(name) is None
    with pytest.raises(CorruptModel) as e:
        s.find(name)
    assert e.value.status == 500 and e.value.code == "model_corrupt"
    path = s.manifest_path(name)
    assert e.value.message.startswith(f"the manifest of model 'bad:latest' ({path}) is corrupt: ")
    assert says in e.value.message
    with pytest.raises(CorruptModel):
        s.copy(name, parse_name("other"))
    # `xllm rm` is the repair: the manifest goes, with the blobs only it named when it tells them
    assert s.delete(name) and s.find(name) is None
    left = [x.digest for x in manifest.blobs() if s.has_blob(x.digest)]
    assert left == [] if parses else len(left) == len(manifest.blobs())
    good = s.find(parse_name("good"))
    assert good is not None and good.model_path.is_file()
