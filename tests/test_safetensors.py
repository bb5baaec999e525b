"""Safetensors models (Hugging Face folders) pulled from a local stand-in of the Hub.

all-MiniLM-L6-v2, real weights: every file a model needs lands as a verified blob (LFS files by
their SHA-256, git files by their blob id), the manifest only at the end; the folder view, the
summary, export/import and deletion work; faults leave nothing visible.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import hf_folder
from tests.upstream import Upstream, sha
from xllm.config import Settings
from xllm.errors import ModelNotFound, RegistryError
from xllm.models import archive, safetensors
from xllm.models import pull as pulling
from xllm.models.names import parse_name
from xllm.models.store import MODEL_FILE, SAFETENSORS, ManifestError, Store

REPO = "sentence-transformers/all-MiniLM-L6-v2"
NAME = f"hf.co/{REPO}"
NEEDED = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
}
"""The folder's files a model needs (README.md, .gitattributes, data_config.json are not)."""
HOSTILE = {
    "../evil.safetensors": b"x",
    "sub/extra.safetensors": b"y",
    "1_Pooling/../../escape.json": b"{}",
    ".hidden.safetensors": b"z",
}


@pytest.fixture(scope="module")
def folder(minilm_dir: Path) -> dict[str, bytes]:
    return hf_folder(minilm_dir)


@pytest.fixture
def upstream(folder: dict[str, bytes]) -> Iterator[Upstream]:
    u = Upstream()
    u.add_hf_repo(REPO, {**folder, **HOSTILE})
    u.start()
    yield u
    u.stop()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "models")


async def run(store: Store, upstream: Upstream, name: str = NAME) -> list[dict[str, Any]]:
    settings = Settings(registry=upstream.url, hf_endpoint=upstream.url)
    before = manifests(store)
    records = []
    async for record in pulling.pull(store, settings, parse_name(name)):
        if record["status"] != "success":  # the manifest appears only once all is verified
            assert manifests(store) == before, record
        records.append(record)
    return records


def manifests(store: Store) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in store.manifests_dir.rglob("*") if p.is_file()}


def visible(store: Store) -> list[Path]:
    """Blobs, manifests and folder views a user could see."""
    blobs = [p for p in store.blobs_dir.glob("sha256-*") if not p.name.endswith("-partial")]
    return blobs + [p for p in store.root.glob("*/**/*") if p.is_file() and "blobs" not in p.parts]


def header_parameters(path: Path) -> int:
    """The parameter count, read here independently of xllm: 8-byte length, JSON header."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")


async def test_pull_stores_every_file_verified(
    store: Store, upstream: Upstream, folder: dict[str, bytes], minilm_dir: Path
) -> None:
    records = await run(store, upstream)
    assert [r["status"] for r in records][-3:] == [
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    model = store.get(parse_name(NAME))
    assert model is not None and model.format == "safetensors"
    assert dict(model.named_files).keys() == NEEDED
    for name, digest in model.named_files:  # each file a blob under its real SHA-256
        assert digest == sha(folder[name])
        assert store.blob_path(digest).read_bytes() == folder[name]
    media = {x.media_type for x in model.manifest.layers}
    assert media == {SAFETENSORS, MODEL_FILE}
    weights = sha(folder["model.safetensors"])
    assert [x.digest for x in model.manifest.all(SAFETENSORS)] == [weights]
    assert upstream.hits[weights] == 1  # downloaded once, verified by its LFS SHA-256
    for hostile in HOSTILE.values():  # names outside the allowed set are never fetched
        assert upstream.hits[sha(hostile)] == 0
    config = json.loads(store.blob_path(model.manifest.config.digest).read_bytes())
    assert config["model_format"] == "safetensors" and config["source"]["repo"] == REPO

    facts = store.summary_of(model.manifest)
    assert facts.format == "safetensors" and facts.architecture == "BertModel"
    assert facts.parameter_count == header_parameters(minilm_dir / "model.safetensors")
    assert 22_000_000 < facts.parameter_count < 23_000_000
    assert facts.quantization == "F32" and facts.embedding_length == 384
    assert facts.block_count == 6 and facts.context_length == 512
    assert facts.capabilities == ["embedding"]
    assert facts.model_info["general.architecture"] == "bert"
    key = model.manifest.config.digest.replace(":", "-")
    assert (store.metadata_dir / f"{key}.json").is_file()  # cached beside the blobs
    assert Store(store.root).summary_of(model.manifest) == facts  # read back from the cache


async def test_folder_view_and_delete(
    store: Store, upstream: Upstream, folder: dict[str, bytes]
) -> None:
    await run(store, upstream)
    model = store.get(parse_name(NAME))
    assert model is not None
    view = store.model_dir(model)
    assert view == model.model_path and view.is_relative_to(store.root)
    made = {p.relative_to(view).as_posix() for p in view.rglob("*") if p.is_file()}
    assert made == NEEDED
    for name in NEEDED:
        assert (view / name).read_bytes() == folder[name]
        blob = store.blob_path(sha(folder[name]))
        assert (view / name).samefile(blob)  # a link to the blob, not a copy
    assert store.model_dir(model) == view  # made once
    assert store.delete(parse_name(NAME))
    assert not view.exists() and visible(store) == []


async def test_copy_keeps_the_view_until_the_last_one_goes(
    store: Store, upstream: Upstream
) -> None:
    await run(store, upstream)
    model = store.get(parse_name(NAME))
    assert model is not None
    view = store.model_dir(model)
    store.copy(parse_name(NAME), parse_name("minilm"))
    assert store.delete(parse_name(NAME)) and view.is_dir()
    assert store.delete(parse_name("minilm")) and not view.exists()


async def test_a_new_revision_replaces_the_view(store: Store, upstream: Upstream) -> None:
    await run(store, upstream)
    first = store.get(parse_name(NAME))
    assert first is not None
    old_view = store.model_dir(first)
    upstream.hf_sha = "beef" + "0" * 36  # the repo moved on: another config blob, manifest
    await run(store, upstream)
    second = store.get(parse_name(NAME))
    assert second is not None and second.digest != first.digest
    assert not old_view.exists() and store.model_dir(second).is_dir()


async def test_hf_token_reaches_the_git_files(
    store: Store, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.hf_token = "hf_secret"
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    await run(store, upstream)
    assert store.get(parse_name(NAME)) is not None
    resolved = {path.rsplit("/", 1)[-1]: auth for path, auth in upstream.auth_seen}
    assert resolved["config.json"] == resolved["model.safetensors"] == "Bearer hf_secret"


async def test_flipped_weights_byte_fails_with_nothing_visible(
    store: Store, upstream: Upstream, folder: dict[str, bytes]
) -> None:
    upstream.flip.add(sha(folder["model.safetensors"]))
    with pytest.raises(RegistryError, match="digest mismatch"):
        await run(store, upstream)
    assert visible(store) == [] and store.get(parse_name(NAME)) is None
    upstream.flip.clear()
    await run(store, upstream)  # a clean retry succeeds
    assert store.get(parse_name(NAME)) is not None


async def test_git_file_not_matching_its_blob_id_fails(
    store: Store, upstream: Upstream, folder: dict[str, bytes]
) -> None:
    upstream.flip.add(sha(folder["config.json"]))
    with pytest.raises(RegistryError, match=r"config\.json .*does not match its git blob id"):
        await run(store, upstream)
    assert visible(store) == [] and store.get(parse_name(NAME)) is None


async def test_a_quant_tag_is_refused(store: Store, upstream: Upstream) -> None:
    with pytest.raises(ModelNotFound, match="safetensors model, which has no quant tags"):
        await run(store, upstream, f"{NAME}:Q4_K_M")
    assert visible(store) == []


async def test_export_and_import(store: Store, upstream: Upstream, tmp_path: Path) -> None:
    await run(store, upstream)
    model = store.get(parse_name(NAME))
    assert model is not None
    tar = tmp_path / "minilm.tar"
    archive.export(store, parse_name(NAME), tar)
    other = Store(tmp_path / "other")
    imported = await archive.import_(other, tar)
    assert imported.digest == model.digest and imported.format == "safetensors"
    assert other.summary_of(imported.manifest).architecture == "BertModel"
    assert dict(imported.named_files) == dict(model.named_files)


def test_model_file_names() -> None:
    for ok in ("config.json", "1_Pooling/config.json", "model-00001-of-00002.safetensors"):
        assert safetensors.is_model_file(ok)
    for bad in ("../model.safetensors", "/model.safetensors", "a/model.safetensors",
                ".model.safetensors", "README.md", "1_Pooling/../config.json", "x.gguf"):  # fmt: skip
        assert not safetensors.is_model_file(bad)


def test_a_config_naming_a_file_outside_the_folder_is_refused(store: Store) -> None:
    """A hand-made manifest whose config blob names `../x`: never a model, never a link."""
    weights = b"\x08\0\0\0\0\0\0\0{}      "
    digest = asyncio.run(store.add_bytes(weights))
    config = json.dumps({"model_format": "safetensors", "files": {"../x.safetensors": digest,
                         "config.json": digest}}).encode()  # fmt: skip
    config_digest = asyncio.run(store.add_bytes(config))
    raw = json.dumps(
        {
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": SAFETENSORS, "digest": digest, "size": len(weights)}],
        }
    ).encode()  # fmt: skip
    with pytest.raises(ManifestError, match="not a file a model folder holds"):
        store.write_manifest(parse_name("evil"), raw)
    assert store.get(parse_name("evil")) is None


def _weights(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    header = {k: {"dtype": d, "shape": s, "data_offsets": [0, 0]} for k, (d, s) in tensors.items()}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def test_summary_of_a_chat_model_with_two_weights_files(tmp_path: Path) -> None:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "max_position_embeddings": 8192, "hidden_size": 64, "num_hidden_layers": 2}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    files = {
        "config.json": tmp_path / "config.json",
        "tokenizer_config.json": tmp_path / "tokenizer_config.json",
        "model-00001-of-00002.safetensors": _weights(
            tmp_path / "a", {"w": ("BF16", [64, 100]), "n": ("F32", [64])}
        ),
        "model-00002-of-00002.safetensors": _weights(tmp_path / "b", {"v": ("BF16", [3, 64])}),
    }
    facts = safetensors.summarize(files)
    assert facts.architecture == "LlamaForCausalLM" and facts.parameter_count == 6400 + 64 + 192
    assert facts.quantization == "BF16" and facts.capabilities == ["completion", "chat"]
    assert facts.chat_template == "{{ x }}" and facts.context_length == 8192
    assert facts.model_info["llama.block_count"] == 2


def test_a_header_longer_than_its_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(safetensors.SafetensorsError, match="out of range"):
        safetensors.read_header(bad)
